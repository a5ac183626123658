"""Cloud cluster membership, peer links and routing decisions (DESIGN §3)."""
