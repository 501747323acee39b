"""Request bodies of the OpenAI-compatible API, validated with pydantic.

Every field of OpenAI's own request bodies is declared with its type and range, so the
published JSON schema refuses what the handler refuses. Fields an engine cannot honour
(``tools``, a JSON ``response_format``, image parts, ...) are declared too: they are
well-formed requests, relayed by the ``upstream`` engine and refused with 400 naming
the field by the engines that generate here (see :mod:`.compat`). Fields outside
OpenAI's API are allowed by the schema (``additionalProperties``), as the ``upstream``
engine passes them to its server; the local engines refuse them with 400.
Errors name the field at fault (``messages.0.content``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from ..engines.parameters import WHOLE

__all__ = [
    "MAX_CHOICES",
    "MAX_EMBEDDING_INPUTS",
    "MAX_TOKENS_LIMIT",
    "AudioPart",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "EmbeddingRequest",
    "FilePart",
    "ImagePart",
    "Number",
    "RefusalPart",
    "ResponseFormat",
    "StreamOptions",
    "TextPart",
]

MAX_TOKENS_LIMIT = 32_768
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request
MAX_CHOICES = 16  # choices in one answer: n, times the prompts of /v1/completions

# A JSON number: an int is taken too (and becomes a float); a bool or a string is not.
# One type, not a union, so that ranges reach the published schema (pydantic writes
# the bounds of a union as keywords JSON Schema does not know).
Number = StrictFloat
_Object = dict[str, Any]


class _Open(BaseModel):
    """Fields beyond the declared ones are kept (and relayed by ``upstream``)."""

    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    """A text part of a message's content list."""

    type: Literal["text"]
    text: StrictStr


class ImagePart(_Open):
    """An image part (``upstream`` only)."""

    type: Literal["image_url"]
    image_url: _Object


class AudioPart(_Open):
    """An audio part (``upstream`` only)."""

    type: Literal["input_audio"]
    input_audio: _Object


class FilePart(_Open):
    """A file part (``upstream`` only)."""

    type: Literal["file"]
    file: _Object


class RefusalPart(_Open):
    """An assistant message's refusal part."""

    type: Literal["refusal"]
    refusal: StrictStr


ContentPart = Annotated[
    TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")
]


class ChatMessage(_Open):
    """One message of a chat request."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[_Object] | None = None
    tool_call_id: StrictStr | None = None
    function_call: _Object | None = None
    refusal: StrictStr | None = None
    audio: _Object | None = None

    def text(self) -> str:
        """The message's text, text parts joined (other parts are refused first)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


class StreamOptions(_Open):
    """``stream_options``."""

    include_usage: StrictBool = False


class ResponseFormat(_Open):
    """``response_format``: ``text`` is what every engine writes; ``json_object`` and
    ``json_schema`` are relayed by ``upstream`` and refused by the local engines."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: _Object | None = None


_Tokens = Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT), WHOLE]
_Penalty = Annotated[Number, Field(ge=-2, le=2)]


class _Sampling(_Open):
    model: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    max_tokens: _Tokens | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    seed: Annotated[StrictInt, WHOLE] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES), WHOLE] | None = None
    frequency_penalty: _Penalty | None = None
    presence_penalty: _Penalty | None = None
    logit_bias: dict[str, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    user: StrictStr | None = None

    def stop_sequences(self) -> tuple[str, ...]:
        """``stop`` as a tuple, empty strings dropped."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    def choices(self) -> int:
        """``n``, 1 when absent."""
        return self.n or 1


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: _Tokens | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20), WHOLE] | None = None
    tools: list[_Object] | None = None
    tool_choice: StrictStr | _Object | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[_Object] | None = None
    function_call: StrictStr | _Object | None = None
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: _Object | None = None
    prediction: _Object | None = None
    reasoning_effort: StrictStr | None = None
    verbosity: StrictStr | None = None
    web_search_options: _Object | None = None
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: StrictStr | None = None
    safety_identifier: StrictStr | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt or a list (each gets ``n`` choices)."""

    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_CHOICES)]
    echo: StrictBool | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=5), WHOLE] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES), WHOLE] | None = None
    suffix: StrictStr | None = None

    def prompts(self) -> list[str]:
        """The prompts, as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class EmbeddingRequest(_Open):
    """``POST /v1/embeddings``: one text or a list of them. Token arrays are refused:
    token ids belong to one engine's tokenizer."""

    model: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    input: (
        Annotated[StrictStr, Field(min_length=1)]
        | Annotated[
            list[Annotated[StrictStr, Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS),
        ]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1), WHOLE] | None = None
    user: StrictStr | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _texts_only(cls, value: Any) -> Any:
        # One clear message instead of pydantic's one per member of the union.
        texts = [value] if isinstance(value, str) else value
        if (
            not isinstance(texts, list)
            or not 1 <= len(texts) <= MAX_EMBEDDING_INPUTS
            or not all(isinstance(t, str) and t for t in texts)
        ):
            raise ValueError(
                f"must be a non-empty string or a list of 1 to {MAX_EMBEDDING_INPUTS} "
                "non-empty strings (token arrays are not supported)"
            )
        return value

    def texts(self) -> list[str]:
        """The inputs as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)
