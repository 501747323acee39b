"""Prometheus metrics summed over every worker process of the server."""

from .counts import Count, Counts
from .families import Metrics
from .store import enable_multiprocess, forget_process, metrics_directory, render, server_identity

__all__ = [
    "Count",
    "Counts",
    "Metrics",
    "enable_multiprocess",
    "forget_process",
    "metrics_directory",
    "render",
    "server_identity",
]
