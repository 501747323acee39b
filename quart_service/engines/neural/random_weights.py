"""Write a GPT-2 safetensors file of random weights, for tests, benches and a first try.

    python -m quart_service.engines.neural.random_weights model.safetensors \\
        --layers 8 --heads 8 --embd 512 --vocab 256 --ctx 1024 --seed 0

The file has Hugging Face's tensor names and layout, so the engine reads it as it
reads real GPT-2 weights; its ``__metadata__`` holds the config (and ``tokenizer:
bytes``: ids 0..255 are the bytes). Weights are drawn as GPT-2's initialisation draws
them (normal, standard deviation 0.02; layer norms at 1 and 0), from ``seed``: the
same seed writes the same file. The text such a model writes is noise, but it is
computed exactly as a trained model's would be, at the same cost.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .safetensors_file import write_safetensors
from .weights import GPT2Config, tensor_shapes

__all__ = ["main", "write_random_weights"]


def write_random_weights(path: Path, config: GPT2Config, seed: int = 0) -> int:
    """Write random GPT-2 weights of ``config`` to ``path``; returns the file's size."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, npt.NDArray[np.float32]] = {}
    for name, shape in tensor_shapes(config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            tensors[name] = np.ones(shape, dtype=np.float32)
        elif name.endswith(".bias"):
            tensors[name] = np.zeros(shape, dtype=np.float32)
        else:
            tensor = rng.standard_normal(shape, dtype=np.float32)
            tensor *= np.float32(0.02)
            tensors[name] = tensor
    write_safetensors(path, tensors, {**config.as_metadata(), "tokenizer": "bytes"})
    return Path(path).stat().st_size


def main(argv: list[str] | None = None) -> None:
    """The command line: write the file, print its size and parameter count."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = GPT2Config(
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.embd,
        vocab_size=args.vocab,
        n_ctx=args.ctx,
    )
    if config.vocab_size < 256:
        parser.error("--vocab must be at least 256 (the byte tokens)")
    size = write_random_weights(args.path, config, args.seed)
    print(f"{args.path}: {size / 1e6:.1f} MB, {config.parameters:,} parameters, {config}")


if __name__ == "__main__":
    main()
