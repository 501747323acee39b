"""What an operator sees of a worker: metrics, request ids, the access log, log lines."""

from .request_id import current_request_id

__all__ = ["current_request_id"]
