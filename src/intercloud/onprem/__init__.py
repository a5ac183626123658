"""The on-prem role: dials tunnels out to the cloud gateways."""
