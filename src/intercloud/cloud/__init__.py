"""The cloud role: accepts tunnels from on-prem gateways."""
