"""Runs protocol connections over WebSocket transports; local stream pumps with back-pressure."""
