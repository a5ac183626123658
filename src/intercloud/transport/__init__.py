"""Byte transports under the tunnel: TLS contexts, HTTP CONNECT through forward proxies."""
