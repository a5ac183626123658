"""Gateway configuration: one TOML file per gateway, validated as a whole on load.

    from intercloud.config import load_config, ConfigError, Config

    try:
        cfg = load_config("/etc/intercloud/gateway.toml")
    except ConfigError as exc:
        print(exc)              # "<file>: invalid configuration (N problems):\\n  key.path: message ..."
        exc.problems            # [(key path, message), ...]

Durations are float seconds, sizes int bytes; secrets are :class:`Secret` objects that print as
``***``. See ``docs/configuration.md`` for every key.
"""

from .load import ConfigError, Problem, load_config, parse_config
from .model import ClusterConfig, Config, GatewayConfig, Service, Tenant, TlsConfig, TunnelConfig
from .units import format_duration, format_size, parse_duration, parse_size
from .values import Endpoint, HostPort, ProxyUrl, Secret, WsUrl, is_loopback_host

__all__ = [
    "ClusterConfig",
    "Config",
    "ConfigError",
    "Endpoint",
    "GatewayConfig",
    "HostPort",
    "Problem",
    "ProxyUrl",
    "Secret",
    "Service",
    "Tenant",
    "TlsConfig",
    "TunnelConfig",
    "WsUrl",
    "format_duration",
    "format_size",
    "is_loopback_host",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]
