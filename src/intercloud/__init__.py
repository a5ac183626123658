"""intercloud: TCP services between cloud and on-premise networks over outbound TLS WebSocket tunnels."""

__version__ = "0.1.0"
