"""The service's own routes: health, identity, /metrics and the demo stream."""
