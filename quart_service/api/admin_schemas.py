"""Request and response bodies of ``/admin/models``, validated with pydantic.

Unknown fields are refused (an admin typo must not be ignored); each engine's
``parameters`` are checked by the engine's own declaration
(:mod:`quart_service.engines.parameters`) after these.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

__all__ = [
    "NAME_PATTERN",
    "ModelCreate",
    "ModelList",
    "ModelUpdate",
    "ModelView",
]

#: A model name: segments of letters, digits and ``._:-`` joined by ``/`` (as in
#: ``org/model-7b``); no segment starts with a dot, so a name is never ``..`` or
#: ``a/./b``, which an HTTP client would rewrite in ``/admin/models/<name>``.
NAME_PATTERN = r"^[A-Za-z0-9_:-][A-Za-z0-9._:-]*(/[A-Za-z0-9_:-][A-Za-z0-9._:-]*)*$"

_Name = Annotated[StrictStr, Field(min_length=1, max_length=200, pattern=NAME_PATTERN)]
_EngineName = Annotated[StrictStr, Field(min_length=1, max_length=100)]


class ModelCreate(BaseModel):
    """``POST /admin/models``."""

    model_config = ConfigDict(extra="forbid")

    name: _Name
    engine: _EngineName
    parameters: dict[str, Any] = Field(default_factory=dict)
    enabled: StrictBool = True


class ModelUpdate(BaseModel):
    """``PATCH /admin/models/<name>``: the fields to change (at least one; none null).
    ``parameters`` replaces the stored object; a write-only parameter sent back as
    ``"***"`` keeps its stored value."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    # Not Optional: an explicit null is refused, as the document says.
    engine: _EngineName = None  # type: ignore[assignment]
    parameters: dict[str, Any] = None  # type: ignore[assignment]
    enabled: StrictBool = None  # type: ignore[assignment]


class ModelView(BaseModel):
    """A model as the admin API shows it: write-only parameters as ``"***"``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    engine: str
    parameters: dict[str, Any]
    enabled: bool
    updated_at: str


class ModelList(BaseModel):
    """``GET /admin/models``."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelView]
