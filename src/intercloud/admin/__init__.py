"""Admin HTTP endpoint: health, readiness, status JSON, Prometheus metrics."""
