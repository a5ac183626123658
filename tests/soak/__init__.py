"""Chaos soak: real gateways in network namespaces under load and random faults (``scripts/soak``)."""
