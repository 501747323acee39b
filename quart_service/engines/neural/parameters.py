"""The ``neural`` engine's parameters, checked when a model is written (imports no
numpy: the admin API checks them in any service)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ..parameters import WHOLE, EngineParameters

__all__ = ["NeuralParameters"]


class NeuralParameters(EngineParameters):
    """``weights`` (a .safetensors path on every host), ``load``, ``tokenizer``
    (``bytes``, ``gpt2-bytes`` or a tokenizer.json path), ``tokens_per_second``,
    ``max_batch``, ``embed_batch``, ``prefill_chunk``, ``prompts_first`` and
    ``decode_batch`` (see
    docs/engines.md; a parameter the engine reads must be declared here, or the admin
    API refuses it)."""

    weights: Annotated[str, Field(min_length=1)]
    load: Literal["mmap", "copy"] = "mmap"
    tokenizer: Annotated[str, Field(pattern=r"^(bytes|gpt2-bytes|.+\.json)$")] | None = None
    tokens_per_second: Annotated[float, Field(ge=0, le=10_000)] = 0
    max_batch: Annotated[int, Field(ge=0, le=4096), WHOLE] = 32
    embed_batch: Annotated[int, Field(ge=0, le=4096), WHOLE] = 64
    prefill_chunk: Annotated[int, Field(ge=0, le=4096), WHOLE] = 256
    prompts_first: bool = True
    decode_batch: Annotated[int, Field(ge=0, le=4096), WHOLE] = 0
