"""An app whose start-up hook always fails, as a broken deploy would."""

from __future__ import annotations

from quart import Quart

app = Quart(__name__)


@app.before_serving
async def connect() -> None:
    raise RuntimeError("cannot reach the model store (on purpose, for the test)")
