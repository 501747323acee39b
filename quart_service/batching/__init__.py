"""Batching over the shared pool: many callers or streams, one job at a time.

- :class:`Batcher` groups concurrent calls into one singleton (an embedding model, a
  classifier) into one ``fn(items)`` job: at most ``max_batch`` items, waiting at most
  ``max_wait`` seconds for them.
- :class:`StepBatcher` batches streams step by step (continuous batching): every
  step advances all active streams at once; streams join and leave between steps.

Both run their jobs through the ``run`` they are given (``EngineContext.run_sync``:
the worker's one pool, admitted work) and both survive what their callers do:
cancellation, disconnects, timeouts, slow readers, exceptions. docs/batching.md is
the how-to.
"""

from .calls import Batcher, BatcherStats
from .steps import StepBatcher, Steppable, StepStats

__all__ = ["Batcher", "BatcherStats", "StepBatcher", "StepStats", "Steppable"]
