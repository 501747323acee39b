"""An engine's parameters, declared as a pydantic model and checked when a model is
written (``POST``/``PATCH /admin/models``), not first when a request builds the engine.

A factory declares them with :func:`parameters`::

    class MyParameters(EngineParameters):
        temperature_floor: float = 0.0
        api_key: SecretStr | None = None     # write-only: never returned

    @parameters(MyParameters)
    async def create(model: ModelConfig, context: EngineContext) -> Engine: ...

:class:`EngineParameters` refuses unknown names (a typo such as ``temperatur`` is a
400, not a silently ignored key) and takes values strictly (``"fast"`` is no number).
Fields typed :class:`~pydantic.SecretStr` are write-only: the admin API shows them as
:data:`REDACTED`, and a :data:`REDACTED` sent back keeps the stored value. A factory
without a declaration takes any JSON object, as before (its engine checks its
parameters when it is built).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, SecretStr, ValidationError

from ..errors import InvalidParameter

__all__ = [
    "REDACTED",
    "WHOLE",
    "EngineParameters",
    "check_parameters",
    "parameters",
    "parameters_schema",
    "redact",
    "secret_names",
]

#: How a write-only parameter is shown; sent back, it keeps the stored value.
REDACTED = "***"

_ATTRIBUTE = "__engine_parameters__"
F = TypeVar("F", bound=Callable[..., Any])


def _whole(value: Any) -> Any:
    # JSON has one number type: 5.0 is the integer 5 to a JSON Schema validator (and to
    # the published document), so it is one here too; 5.5 and "5" stay refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: Put last in an integer parameter's ``Annotated[int, Field(...), WHOLE]`` (after
#: its bounds, which pydantic would otherwise leave out of the JSON schema): a whole
#: JSON number (``5`` or ``5.0``) is taken, never a bool or text.
WHOLE = BeforeValidator(_whole)


class EngineParameters(BaseModel):
    """Base of an engine's parameters: unknown names refused, values taken strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)


def parameters(schema: type[EngineParameters]) -> Callable[[F], F]:
    """Declare the parameters an engine factory takes (a decorator)."""

    def declare(factory: F) -> F:
        setattr(factory, _ATTRIBUTE, schema)
        return factory

    return declare


def parameters_schema(factory: Callable[..., Any]) -> type[EngineParameters] | None:
    """The parameters ``factory`` declared, if it did."""
    schema = getattr(factory, _ATTRIBUTE, None)
    if isinstance(schema, type) and issubclass(schema, EngineParameters):
        return schema
    return None


def secret_names(schema: type[EngineParameters] | None) -> frozenset[str]:
    """The write-only parameters of ``schema`` (fields typed ``SecretStr``)."""
    if schema is None:
        return frozenset()
    return frozenset(
        name
        for name, field in schema.model_fields.items()
        if field.annotation is SecretStr or SecretStr in get_args(field.annotation)
    )


def check_parameters(
    schema: type[EngineParameters] | None,
    given: Mapping[str, Any],
    stored: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``given`` checked against ``schema``; what to store. A secret sent as
    :data:`REDACTED` keeps its value in ``stored`` (the row being changed); without
    one it is refused. Raises :class:`InvalidParameter` naming the parameter
    (``parameters.order``)."""
    values = dict(given)
    for name in secret_names(schema):
        if values.get(name) == REDACTED:
            if stored is None or name not in stored:
                raise InvalidParameter(
                    f"parameter {name!r}: {REDACTED!r} stands for the stored value, and "
                    "none is stored; send the value itself",
                    param=f"parameters.{name}",
                )
            values[name] = stored[name]
    if schema is None:
        return values
    try:
        schema.model_validate(values)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        param = f"parameters.{where}" if where else "parameters"
        message = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"]
        known = ", ".join(sorted(schema.model_fields))
        raise InvalidParameter(
            f"{param!r}: {message} (this engine takes: {known})", param=param
        ) from None
    return values


def redact(schema: type[EngineParameters] | None, stored: Mapping[str, Any]) -> dict[str, Any]:
    """``stored`` as the admin API shows it: each write-only value as :data:`REDACTED`."""
    secrets = secret_names(schema)
    return {
        name: REDACTED if name in secrets and value is not None else value
        for name, value in stored.items()
    }
