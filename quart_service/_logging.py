"""The service's log lines on stderr, in Hypercorn's format, so one stream reads well."""

from __future__ import annotations

import logging

_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Give the ``quart_service`` logger a stderr handler unless one is configured."""
    logger = logging.getLogger("quart_service")
    logger.setLevel(level.upper())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, "%Y-%m-%d %H:%M:%S %z"))
        logger.addHandler(handler)
