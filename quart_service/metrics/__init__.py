"""Prometheus metrics summed over every worker process of the server."""

from .families import ExportedCounts, ServiceMetrics, process_metrics
from .store import enable_multiprocess, metrics_directory, render, server_identity

__all__ = [
    "ExportedCounts",
    "ServiceMetrics",
    "enable_multiprocess",
    "metrics_directory",
    "process_metrics",
    "render",
    "server_identity",
]
