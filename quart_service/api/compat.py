"""What the engines that generate here (``local``, ``neural``, plugins) make of OpenAI's
request fields: a field they cannot honour is refused with 400 naming it (``param``),
never silently ignored. The ``upstream`` engine relays every field instead, so none of
this applies to it.

Three kinds of field besides those that are honoured:

* accepted and without effect here, as they change nothing in the text (``user``,
  ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``, ...);
* refused unless they hold their neutral value (``tools: []``, ``tool_choice: "none"``,
  ``response_format: {"type": "text"}``, penalties of 0, an empty ``logit_bias``,
  ``modalities: ["text"]``);
* unknown to OpenAI's API: refused, as OpenAI itself does ("Unrecognized request
  argument supplied").

docs/api.md has the table.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidParameter
from .schemas import ChatCompletionRequest, CompletionRequest, TextPart

__all__ = ["check_chat", "check_completion"]


def _refuse(param: str, why: str) -> InvalidParameter:
    return InvalidParameter(
        f"'{param}' is not supported by this model's engine: {why}. "
        "Leave it out, or use a model whose engine is 'upstream'.",
        param=param,
        code="unsupported_parameter",
    )


def _neutral(value: Any, *neutral: Any) -> bool:
    return value is None or any(value == n for n in neutral)


def _common(body: ChatCompletionRequest | CompletionRequest) -> None:
    if not _neutral(body.logit_bias, {}):
        raise _refuse("logit_bias", "it samples without biases")
    if not _neutral(body.frequency_penalty, 0):
        raise _refuse("frequency_penalty", "it samples without penalties")
    if not _neutral(body.presence_penalty, 0):
        raise _refuse("presence_penalty", "it samples without penalties")


def _unknown(extra: dict[str, Any] | None, prefix: str = "") -> None:
    for name in extra or {}:
        raise InvalidParameter(
            f"Unrecognized request argument supplied: {prefix}{name}.",
            param=f"{prefix}{name}",
            code="unsupported_parameter",
        )


def check_chat(body: ChatCompletionRequest, logprobs: bool) -> None:
    """Raise 400 for the first field of ``body`` that an engine writing plain text
    cannot honour; ``logprobs``: whether the engine reports log-probabilities."""
    if body.tools:
        raise _refuse("tools", "it writes text and never calls tools")
    if not _neutral(body.tool_choice, "none"):
        raise _refuse("tool_choice", "it writes text and never calls tools")
    if body.functions:
        raise _refuse("functions", "it writes text and never calls functions")
    if not _neutral(body.function_call, "none"):
        raise _refuse("function_call", "it writes text and never calls functions")
    if body.response_format is not None and body.response_format.type != "text":
        raise _refuse("response_format", "it cannot constrain its text to JSON")
    _common(body)
    if not _neutral(body.modalities, ["text"]):
        raise _refuse("modalities", "it writes text only")
    for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
        if getattr(body, name) is not None:
            raise _refuse(name, "the engine has no such feature")
    if body.logprobs and not logprobs:
        raise _refuse("logprobs", "it does not report log-probabilities")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParameter(
            "'top_logprobs' needs 'logprobs': true.", param="top_logprobs", code="invalid_value"
        )
    for i, message in enumerate(body.messages):
        where = f"messages.{i}"
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if not isinstance(part, TextPart):
                    raise _refuse(f"{where}.content.{j}", f"it reads text, not {part.type}")
        for name in ("tool_calls", "function_call", "audio"):
            if getattr(message, name) is not None:
                raise _refuse(f"{where}.{name}", "the engine has no such feature")
        _unknown(message.model_extra, f"{where}.")
    _unknown(body.model_extra)


def check_completion(body: CompletionRequest, logprobs: bool) -> None:
    """As :func:`check_chat`, for ``/v1/completions``."""
    if body.suffix:
        raise _refuse("suffix", "it continues a text and does not insert into one")
    if body.best_of is not None and body.best_of != body.choices():
        raise _refuse("best_of", "it returns every choice it writes (best_of must equal n)")
    _common(body)
    if body.logprobs is not None and not logprobs:
        raise _refuse("logprobs", "it does not report log-probabilities")
    if body.echo and body.logprobs is not None:
        raise _refuse("echo", "it reports no log-probabilities for the prompt's tokens")
    _unknown(body.model_extra)
