"""The service's built-in blueprints: health, identity, demo."""
