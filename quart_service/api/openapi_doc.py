"""``GET /openapi.json``: the OpenAPI 3.1 document of this app, as it is mounted.

Built once per worker from the app's own routes, so it lists what answers and nothing
else: the admin operations only when the admin API is on, every team blueprint's
routes (each under its blueprint's tag, summarised by its view's docstring, with a
``default`` response: the service cannot know a team's statuses). The service's own
operations come from the pydantic schemas that validate their requests (the document
cannot drift from them), with every status they answer. ``POST /admin/models`` is one
variant per installed engine, each with the parameters that engine declares
(:mod:`quart_service.engines.parameters`), so the document refuses what the API
refuses. Routes of mounted WSGI apps are outside Quart's URL map and not listed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from quart import Blueprint, Quart, current_app
from werkzeug.routing import Rule

from .._version import __version__
from ..context import engines
from ..engines.base import EngineFactory
from ..engines.parameters import parameters_schema
from .admin import VISIBLE_HEADER
from .admin_schemas import NAME_PATTERN, ModelList, ModelUpdate, ModelView
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

__all__ = ["build_document", "openapi"]

openapi = Blueprint("openapi", __name__)

_EXTENSION = "quart_service.openapi"
# Endpoints the document does not list: itself and the page that shows it.
_HIDDEN = ("openapi.", "docs.")
_PARAMETER = re.compile(r"<(?:(?P<converter>[a-zA-Z_][a-zA-Z0-9_]*)(?:\([^)]*\))?:)?(?P<name>\w+)>")

_REASONS = {
    200: "OK",
    201: "Created",
    400: "Invalid request: the body is not JSON, a field is missing, of the wrong type "
    "or out of range (`param` names it)",
    401: "Missing or wrong bearer token",
    404: "No such model (or path)",
    409: "A model of that name exists",
    413: "The body is over max_body_size (the message states the limit)",
    502: "The engine failed (e.g. its upstream is down)",
    503: "Overloaded, or the database busy or unreachable: retry after Retry-After seconds",
}


def _error(status: int, schema: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": _REASONS[status],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }
    if status == 503:
        answer["headers"] = {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}
        }
    return answer


def _ref(model: type[BaseModel] | str) -> dict[str, str]:
    name = model if isinstance(model, str) else model.__name__
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _v1(
    summary: str, ok: dict[str, Any], errors: tuple[int, ...], body: type[BaseModel] | None = None
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "tags": ["v1"],
        "responses": {"200": ok, **{str(s): _error(s, "OpenAIError") for s in errors}},
    }
    if body is not None:
        operation["requestBody"] = _body(_ref(body))
    return operation


_STREAM_OR_WHOLE = {
    "description": "The whole answer (JSON), or with `stream: true` server-sent events",
    "content": {"application/json": {}, "text/event-stream": {}},
}
_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The model's name",
    "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": NAME_PATTERN},
}
_VISIBLE = {
    VISIBLE_HEADER: {
        "description": "true: every worker of this host serves the change already; "
        "false: the wait ran out, the change arrives with the next good refresh",
        "schema": {"type": "string", "enum": ["true", "false"]},
    }
}


def _admin(
    summary: str,
    ok: int,
    schema: type[BaseModel],
    errors: tuple[int, ...],
    *,
    body: dict[str, Any] | None = None,
    named: bool = False,
    write: bool = False,
) -> dict[str, Any]:
    answer = _json(_ref(schema), _REASONS[ok])
    if write:
        answer["headers"] = _VISIBLE
    operation: dict[str, Any] = {
        "summary": summary,
        "tags": ["admin"],
        "security": [{"bearer": []}],
        "responses": {
            str(ok): answer,
            **{str(s): _error(s, "ServiceError") for s in (401, *errors, 503)},
        },
    }
    if named:
        operation["parameters"] = [_NAME]
    if body is not None:
        operation["requestBody"] = _body(body)
    return operation


def _model_create(factories: Mapping[str, EngineFactory], schemas: dict[str, Any]) -> Any:
    """``POST /admin/models``: one variant per installed engine, with its parameters."""
    variants = []
    for name in sorted(factories):
        declared = parameters_schema(factories[name])
        required = ["name", "engine"]
        if declared is None:
            parameters: dict[str, Any] = {"type": "object"}
        else:
            _add(declared, schemas)
            parameters = _ref(declared)
            if any(field.is_required() for field in declared.model_fields.values()):
                required.append("parameters")  # the default {} lacks them
        variants.append(
            {
                "type": "object",
                "additionalProperties": False,
                "required": required,
                "properties": {
                    "name": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 200,
                        "pattern": NAME_PATTERN,
                    },
                    "engine": {"const": name},
                    "parameters": parameters,
                    "enabled": {"type": "boolean", "default": True},
                },
            }
        )
    return {"title": "ModelCreate", "oneOf": variants}


def _model_update(factories: Mapping[str, EngineFactory], schemas: dict[str, Any]) -> Any:
    """``PATCH``: ``engine`` one of the installed, ``parameters`` any engine's. Which
    engine's apply depends on the stored row (the new ``engine``, else the row's),
    which no schema can say: the API checks it (400 naming the parameter)."""
    schema = ModelUpdate.model_json_schema()
    schema["description"] = (
        "The fields to change. parameters replace the stored ones and must suit the "
        "model's engine (the new one if engine is sent, else the stored one); a "
        "write-only parameter sent as '***' keeps its stored value."
    )
    for field in schema["properties"].values():
        field.pop("default", None)  # absent means unchanged; null is refused
    schema["properties"]["engine"] = {"enum": sorted(factories)}
    declared = [parameters_schema(f) for f in factories.values()]
    if all(d is not None for d in declared):
        options = []
        for d in declared:
            assert d is not None
            _add(d, schemas)
            options.append(_ref(d))
        schema["properties"]["parameters"] = {"anyOf": options}
    return schema


def _add(model: type[BaseModel], schemas: dict[str, Any]) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema


def _operations(factories: Mapping[str, EngineFactory], schemas: dict[str, Any]) -> Any:
    """The service's own operations, by OpenAPI path and method."""
    models: list[type[BaseModel]] = [
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingRequest,
        ModelView,
        ModelList,
    ]
    for model in models:
        _add(model, schemas)
    schemas["ModelCreate"] = _model_create(factories, schemas)
    schemas["ModelUpdate"] = _model_update(factories, schemas)
    model_id = {
        "name": "model_id",
        "in": "path",
        "required": True,
        "description": "The model's id",
        "schema": {"type": "string", "minLength": 1},
    }
    one_model = _v1("One enabled model", _json({"type": "object"}), (401, 404, 503))
    one_model["parameters"] = [model_id]
    return {
        "/v1/models": {
            "get": _v1("List the enabled models", _json({"type": "object"}), (401, 503))
        },
        "/v1/models/{model_id}": {"get": one_model},
        "/v1/chat/completions": {
            "post": _v1(
                "Chat completion, whole or streamed",
                _STREAM_OR_WHOLE,
                (400, 401, 404, 413, 502, 503),
                ChatCompletionRequest,
            )
        },
        "/v1/completions": {
            "post": _v1(
                "Text completion, whole or streamed",
                _STREAM_OR_WHOLE,
                (400, 401, 404, 413, 502, 503),
                CompletionRequest,
            )
        },
        "/v1/embeddings": {
            "post": _v1(
                "Embeddings of one text or a list",
                _json({"type": "object"}),
                (400, 401, 404, 413, 502, 503),
                EmbeddingRequest,
            )
        },
        "/admin/models": {
            "get": _admin("List every model", 200, ModelList, ()),
            "post": _admin(
                "Create a model (answers once every worker of this host serves it)",
                201,
                ModelView,
                (400, 409, 413),
                body=_ref("ModelCreate"),
                write=True,
            ),
        },
        "/admin/models/{name}": {
            "get": _admin("One model", 200, ModelView, (404,), named=True),
            "patch": _admin(
                "Update a model (parameters replace the stored ones; '***' keeps a secret)",
                200,
                ModelView,
                (400, 404, 413),
                body=_ref("ModelUpdate"),
                named=True,
                write=True,
            ),
            "delete": _admin(
                "Delete a model (streams already running on it finish)",
                200,
                ModelView,
                (404,),
                named=True,
                write=True,
            ),
        },
    }


def _path(rule: Rule) -> tuple[str, list[dict[str, Any]]]:
    """A Werkzeug rule as an OpenAPI path, and its path parameters."""
    parameters = []
    for match in _PARAMETER.finditer(rule.rule):
        kind = {"int": "integer", "float": "number"}.get(match["converter"] or "", "string")
        parameters.append(
            {"name": match["name"], "in": "path", "required": True, "schema": {"type": kind}}
        )
    return _PARAMETER.sub(r"{\g<name>}", rule.rule), parameters


def _generic(app: Quart, rule: Rule, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    """A route the service does not describe itself (a team's, or an operations
    route): its docstring, its blueprint as tag, any status."""
    view = app.view_functions.get(rule.endpoint)
    doc = (getattr(view, "__doc__", None) or "").strip()
    operation: dict[str, Any] = {
        "summary": doc.splitlines()[0] if doc else rule.endpoint,
        "tags": [rule.endpoint.rpartition(".")[0] or "app"],
        "responses": {"default": {"description": "See the route's own documentation"}},
    }
    if doc:
        operation["description"] = doc
    if parameters:
        operation["parameters"] = parameters
    return operation


def build_document(app: Quart, factories: Mapping[str, EngineFactory]) -> dict[str, Any]:
    """The OpenAPI document of ``app`` as mounted, with ``factories`` (the installed
    engines) for the admin API's bodies."""
    schemas: dict[str, Any] = {}
    known = _operations(factories, schemas)
    for name in ("ServiceError", "OpenAIError"):
        schemas[name] = _ERROR_SCHEMAS[name]
    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith(_HIDDEN):
            continue
        path, parameters = _path(rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            verb = method.lower()
            operation = known.get(path, {}).get(verb) or _generic(app, rule, parameters)
            paths.setdefault(path, {})[verb] = operation
    uses_admin = any("admin" in op.get("tags", ()) for ops in paths.values() for op in ops.values())
    components: dict[str, Any] = {"schemas": schemas}
    if uses_admin:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    else:
        for name in ("ModelCreate", "ModelUpdate", "ModelView", "ModelList"):
            schemas.pop(name, None)
    return {
        "openapi": "3.1.0",
        "info": {"title": "quart_service", "version": __version__},
        "paths": dict(sorted(paths.items())),
        "components": components,
    }


_ERROR_SCHEMAS: dict[str, Any] = {
    "ServiceError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "status"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "status": {"type": "integer"},
                    "param": {"type": "string"},
                },
            }
        },
    },
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
}


@openapi.get("/openapi.json")
async def openapi_json() -> dict[str, Any]:
    """The OpenAPI document (built on this worker's first request for it)."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    document: dict[str, Any] | None = app.extensions.get(_EXTENSION)
    if document is None:
        factories = (await engines().engines()).factories
        document = app.extensions[_EXTENSION] = build_document(app, factories)
    return document
