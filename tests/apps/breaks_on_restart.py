"""An app that serves until a file appears, then fails at every later start-up, as a
deploy that breaks while workers run would. The file is ``$BREAK_MARKER``."""

from __future__ import annotations

import os

from quart import Quart

app = Quart(__name__)


@app.before_serving
def check() -> None:  # sync: Quart runs it in a thread
    if os.path.exists(os.environ["BREAK_MARKER"]):
        raise RuntimeError("the model store is gone (on purpose, for the test)")


@app.get("/livez")
async def livez() -> dict[str, int]:
    return {"pid": os.getpid()}
