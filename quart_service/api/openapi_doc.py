"""``GET /openapi.json``: the API's OpenAPI 3.1 document, built from the pydantic
schemas that validate the requests (so the document cannot drift from them)."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from quart import Blueprint

from .._version import __version__
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelCreate,
    ModelUpdate,
)

__all__ = ["document", "openapi"]

openapi = Blueprint("openapi", __name__)

_ERROR = {"description": "An error in OpenAI's shape: {error: {message, type, param, code}}"}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"required": True, "content": {"application/json": {"schema": ref}}}


def _operation(summary: str, model: type[BaseModel] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK"}, "400": _ERROR, "404": _ERROR, "503": _ERROR},
    }
    if model is not None:
        operation["requestBody"] = _body(model)
    return operation


@cache
def document() -> dict[str, Any]:
    """The OpenAPI document (built once per process)."""
    models: list[type[BaseModel]] = [
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingRequest,
        ModelCreate,
        ModelUpdate,
    ]
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    admin: dict[str, Any] = {"security": [{"bearer": []}]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "quart_service", "version": __version__},
        "paths": {
            "/v1/models": {"get": _operation("List the enabled models")},
            "/v1/chat/completions": {
                "post": _operation("Chat completion, whole or streamed", ChatCompletionRequest)
            },
            "/v1/completions": {
                "post": _operation("Text completion, whole or streamed", CompletionRequest)
            },
            "/v1/embeddings": {
                "post": _operation("Embeddings of one text or a list", EmbeddingRequest)
            },
            "/admin/models": {
                "get": {**_operation("List every model"), **admin},
                "post": {**_operation("Create a model", ModelCreate), **admin},
            },
            "/admin/models/{name}": {
                "patch": {**_operation("Update a model", ModelUpdate), **admin},
                "delete": {**_operation("Disable a model"), **admin},
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@openapi.get("/openapi.json")
async def openapi_json() -> dict[str, Any]:
    """The OpenAPI document."""
    return document()
