"""The admin API as tests use it to set a server up."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx


def create_model(
    url: str, token: str, name: str, engine: str, parameters: Mapping[str, Any]
) -> None:
    """Create model row ``name`` of ``engine`` through ``POST /admin/models`` of the
    server at ``url``, with the admin ``token``; fail unless it is created (201).

    Named apart from :func:`.data.put_model`, which writes the row with SQL instead."""
    response = httpx.post(
        url + "/admin/models",
        json={"name": name, "engine": engine, "parameters": dict(parameters)},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
