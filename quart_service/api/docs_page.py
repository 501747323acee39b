"""``GET /docs``: interactive API documentation (Swagger UI) of ``/openapi.json``.

The page's scripts and styles are served by the service itself, from the
``swagger-ui-py`` package's copy of Swagger UI (a deployment may have no internet
access; the page loads nothing from elsewhere). URLs are relative, so the page also
works behind a proxy that mounts the service under a prefix.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from quart import Blueprint, Response

from ..errors import NotFound

__all__ = ["ASSETS", "docs"]

#: The Swagger UI files the page uses (nothing else of the package is served).
ASSETS = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"})

docs = Blueprint("docs", __name__)

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>quart_service API</title>
<link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/init.js"></script>
</body>
</html>
"""

# A file of its own, not an inline script: the page works under a strict
# Content-Security-Policy (script-src 'self').
_INIT = """window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  tryItOutEnabled: false
});
"""


def _assets_folder() -> Path | None:
    # find_spec, not import: the package's own module pulls in its web framework glue.
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@cache
def _read(path: Path) -> bytes:
    return path.read_bytes()  # read once per worker, on first use (1.5 MB in all)


@docs.get("/docs")
async def page() -> Response:
    """The Swagger UI page."""
    return Response(_PAGE, content_type="text/html; charset=utf-8")


@docs.get("/docs/init.js")
async def init() -> Response:
    """The page's start-up script."""
    return Response(_INIT, content_type="text/javascript; charset=utf-8")


@docs.get("/docs/assets/<name>")
async def asset(name: str) -> Response:
    """One of Swagger UI's files (cached for a day: they change only with the package)."""
    folder = _assets_folder()
    if name not in ASSETS or folder is None:
        raise NotFound(f"no documentation asset {name!r}")
    kind = {
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".png": "image/png",
    }[Path(name).suffix]
    response = Response(_read(folder / name), content_type=kind)
    response.cache_control.max_age = 86400
    response.cache_control.public = True
    return response
