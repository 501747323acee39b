"""Request bodies of the OpenAI-compatible API, validated with pydantic.

Unknown fields are ignored, as OpenAI's own clients send fields a server may not use;
fields we read are checked strictly and errors name them (``messages.0.content``).
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

__all__ = [
    "MAX_EMBEDDING_INPUTS",
    "MAX_TOKENS_LIMIT",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EmbeddingRequest",
    "ModelCreate",
    "ModelUpdate",
    "Number",
    "StreamOptions",
    "TextPart",
]

MAX_TOKENS_LIMIT = 32_768
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    """A text part of a message's content list."""

    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Lenient):
    """One message of a chat request."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text, parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Lenient):
    """``stream_options``."""

    include_usage: StrictBool = False


Number = StrictFloat | StrictInt


class _Sampling(_Lenient):
    model: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1

    def stop_sequences(self) -> tuple[str, ...]:
        """``stop`` as a tuple, empty strings dropped."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]

    def prompt_text(self) -> str:
        """The prompt (one prompt per request)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(_Lenient):
    """``POST /v1/embeddings``: one text or a list of them. Token arrays are refused:
    token ids belong to one engine's tokenizer."""

    model: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None

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


class ModelCreate(BaseModel):
    """``POST /admin/models``."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[StrictStr, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/-]+$")]
    engine: Annotated[StrictStr, Field(min_length=1, max_length=100)]
    parameters: dict[str, Any] = Field(default_factory=dict)
    enabled: StrictBool = True


class ModelUpdate(BaseModel):
    """``PATCH /admin/models/<name>``: the fields to change."""

    model_config = ConfigDict(extra="forbid")

    engine: Annotated[StrictStr, Field(min_length=1, max_length=100)] | None = None
    parameters: dict[str, Any] | None = None
    enabled: StrictBool | None = None
