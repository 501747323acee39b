"""GPT-2's configuration and tensors, by Hugging Face's names, from a safetensors file.

The names are those of the ``gpt2`` repository's ``model.safetensors`` (``wte.weight``,
``wpe.weight``, ``h.0.ln_1.weight``, ``h.0.attn.c_attn.weight``, ..., ``ln_f.bias``);
a ``transformer.`` prefix (files saved from ``GPT2LMHeadModel``) is accepted, and
tensors the model does not use (``h.0.attn.bias``, the causal mask buffer;
``lm_head.weight``, tied to ``wte``) are ignored. Linear layers are GPT-2's
``Conv1D``: weights are ``[in, out]``, so a layer is ``x @ w + b``.

The configuration comes from the file's ``__metadata__`` (the keys of
:class:`GPT2Config`, as :mod:`.random_weights` writes them); a file without them (a
real GPT-2 file carries only ``{"format": "pt"}``) gets GPT-2's: the layer count,
width, vocabulary and context from the tensors' shapes, heads of 64 dimensions (true
of every GPT-2 size), and GPT-2's layer-norm epsilon.

Float32 tensors stay views of the mapped file. Float16 and bfloat16 ones are
converted to float32, which makes a private copy per process (logged): convert such
a file to float32 once to share it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ...errors import EngineError
from .safetensors_file import MappedSafetensors

__all__ = ["Block", "GPT2Config", "GPT2Weights", "load_weights", "tensor_shapes"]

_log = logging.getLogger("quart_service.engines.neural")

_Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class GPT2Config:
    """The shape of a GPT-2 model; the defaults are GPT-2 small's (124M parameters)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    n_ctx: int = 1024
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_ctx"):
            if getattr(self, name) < 1:
                raise EngineError(f"GPT-2 config: {name} must be at least 1")
        if self.n_embd % self.n_head:
            raise EngineError(
                f"GPT-2 config: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )

    @property
    def parameters(self) -> int:
        """How many numbers the model has (its float32 size is 4 bytes each)."""
        return sum(int(np.prod(shape)) for shape in tensor_shapes(self).values())

    def as_metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` that describes this config (strings only)."""
        return {name: str(value) for name, value in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> GPT2Config | None:
        """The config a file's metadata gives, or None if it gives none."""
        if "n_layer" not in metadata:
            return None
        values: dict[str, Any] = {}
        try:
            for field in fields(cls):
                if field.name in metadata:
                    kind = float if field.name == "layer_norm_epsilon" else int
                    values[field.name] = kind(metadata[field.name])
        except ValueError as exc:
            raise EngineError(f"GPT-2 config in the file's metadata: {exc}") from exc
        return cls(**values)


def tensor_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor the model uses, by its Hugging Face name, with its shape."""
    d = config.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, d),
        "wpe.weight": (config.n_ctx, d),
    }
    for i in range(config.n_layer):
        shapes.update(
            {
                f"h.{i}.ln_1.weight": (d,),
                f"h.{i}.ln_1.bias": (d,),
                f"h.{i}.attn.c_attn.weight": (d, 3 * d),
                f"h.{i}.attn.c_attn.bias": (3 * d,),
                f"h.{i}.attn.c_proj.weight": (d, d),
                f"h.{i}.attn.c_proj.bias": (d,),
                f"h.{i}.ln_2.weight": (d,),
                f"h.{i}.ln_2.bias": (d,),
                f"h.{i}.mlp.c_fc.weight": (d, 4 * d),
                f"h.{i}.mlp.c_fc.bias": (4 * d,),
                f"h.{i}.mlp.c_proj.weight": (4 * d, d),
                f"h.{i}.mlp.c_proj.bias": (d,),
            }
        )
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    return shapes


@dataclass(frozen=True, slots=True)
class Block:
    """One transformer block's tensors (pre-LN: attention, then the MLP)."""

    ln_1_w: _Array
    ln_1_b: _Array
    attn_w: _Array  # [d, 3d]: q, k, v side by side
    attn_b: _Array
    attn_proj_w: _Array  # [d, d]
    attn_proj_b: _Array
    ln_2_w: _Array
    ln_2_b: _Array
    fc_w: _Array  # [d, 4d]
    fc_b: _Array
    fc_proj_w: _Array  # [4d, d]
    fc_proj_b: _Array


@dataclass(frozen=True, slots=True)
class GPT2Weights:
    """A model's tensors, views of the mapped file where they are float32."""

    config: GPT2Config
    wte: _Array  # [vocab, d], also the LM head (tied)
    wpe: _Array  # [n_ctx, d]
    blocks: tuple[Block, ...]
    ln_f_w: _Array
    ln_f_b: _Array
    metadata: dict[str, str]
    private_bytes: int  # bytes this process holds in its own copies (0: all shared)


def _infer_config(file: MappedSafetensors, prefix: str) -> GPT2Config:
    def shape(name: str) -> tuple[int, ...]:
        info = file.tensors.get(prefix + name)
        if info is None:
            raise EngineError(f"{file.path}: no tensor {prefix + name!r}; is this GPT-2?")
        return info.shape

    vocab, d = shape("wte.weight")
    n_ctx = shape("wpe.weight")[0]
    n_layer = 0
    while prefix + f"h.{n_layer}.ln_1.weight" in file.tensors:
        n_layer += 1
    if d % 64:
        raise EngineError(
            f"{file.path}: width {d} is no multiple of GPT-2's 64-dimension heads; "
            "put n_head (and the other GPT2Config keys) in the file's __metadata__"
        )
    return GPT2Config(n_layer=n_layer, n_head=d // 64, n_embd=d, vocab_size=vocab, n_ctx=n_ctx)


def load_weights(path: Path, *, copy: bool = False) -> GPT2Weights:
    """Map ``path`` read-only and return its GPT-2 tensors (``copy``: private copies)."""
    file = MappedSafetensors(path)
    prefix = "transformer." if "transformer.wte.weight" in file.tensors else ""
    config = GPT2Config.from_metadata(file.metadata) or _infer_config(file, prefix)
    private = 0

    def get(name: str, shape: tuple[int, ...]) -> _Array:
        nonlocal private
        info = file.tensors.get(prefix + name)
        if info is None:
            raise EngineError(f"{file.path}: the tensor {prefix + name!r} is missing")
        if info.shape != shape:
            raise EngineError(
                f"{file.path}: tensor {prefix + name!r} has shape {list(info.shape)}, "
                f"the config {config} needs {list(shape)}"
            )
        raw = file.tensor(prefix + name)
        if info.dtype == "F32" and raw.flags.aligned and not copy:
            array: _Array = raw
            return array
        converted = _to_float32(raw, info.dtype, file.path, name)
        private += converted.nbytes
        return converted

    shapes = tensor_shapes(config)
    tensors = {name: get(name, shape) for name, shape in shapes.items()}
    if private and not copy:
        _log.warning(
            "%s: %.1f MB of weights converted to float32 in this process (not shared "
            "between workers); store the file as aligned float32 to share it",
            path,
            private / 1e6,
        )
    blocks = tuple(
        Block(*(tensors[f"h.{i}.{name}"] for name in _BLOCK_TENSORS)) for i in range(config.n_layer)
    )
    return GPT2Weights(
        config=config,
        wte=tensors["wte.weight"],
        wpe=tensors["wpe.weight"],
        blocks=blocks,
        ln_f_w=tensors["ln_f.weight"],
        ln_f_b=tensors["ln_f.bias"],
        metadata=file.metadata,
        private_bytes=private,
    )


_BLOCK_TENSORS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)


def _to_float32(raw: npt.NDArray[Any], dtype: str, path: Path, name: str) -> _Array:
    if dtype == "BF16":
        # bfloat16 is the top half of a float32.
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F32", "F16", "F64"):
        return np.array(raw, dtype=np.float32)  # a private, aligned, writeable copy
    raise EngineError(f"{path}: tensor {name!r} is {dtype}; GPT-2's weights must be floats")
