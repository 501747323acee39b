"""A test app with numeric work: matrix products on numpy's OpenBLAS, on the shared pool.

Started by tests/test_native_threads_e2e.py under a real server. The matrices are a
resource built on first use, the way a model loads, so numpy (and OpenBLAS, which
starts its threads when it loads) is imported after the worker's native thread caps.
``TEST_NUMPY_AT_IMPORT=1`` imports numpy at the top of this module instead, before
``create_app()`` runs: an app module that imports its model library first.
"""

from __future__ import annotations

import os
from typing import Any

from quart import Blueprint, request

if os.environ.get("TEST_NUMPY_AT_IMPORT") == "1":
    import numpy  # noqa: F401  # before create_app(), on purpose

from quart_service import Resource, create_app, resources

# 256 x 256 float64: large enough that OpenBLAS splits each product over its threads.
SIZE = 256


class Matrices:
    """Two random matrices; ``products`` multiplies them ``count`` times."""

    def __init__(self) -> None:
        import numpy as np  # the model library loads here, on first use

        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((SIZE, SIZE))
        self.b = rng.standard_normal((SIZE, SIZE))

    def products(self, count: int) -> float:
        total = 0.0
        for _ in range(count):
            total += float((self.a @ self.b)[0, 0])
        return total


async def _load() -> Matrices:
    return Matrices()


MATRICES = Resource("matrices", _load)

bp = Blueprint("numeric_test", __name__)


@bp.get("/matmul")
async def matmul() -> dict[str, Any]:
    """``count`` products of 256 x 256 matrices, on the worker's shared pool."""
    count = int(request.args.get("count", "4"))
    matrices = await resources().get(MATRICES)
    value = await resources().run_sync(MATRICES, matrices.products, count)
    return {"pid": os.getpid(), "value": value}


app = create_app(resources=[MATRICES], blueprints=[bp])
