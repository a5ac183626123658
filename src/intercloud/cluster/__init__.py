"""Cloud cluster membership, peer links and routing decisions (docs/ha.md)."""
