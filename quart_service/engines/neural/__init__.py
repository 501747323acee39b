"""``neural``: a GPT-2 decoder in numpy, weights memory-mapped from a safetensors file.

Modules: :mod:`.safetensors_file` (the file format, mapped read-only), :mod:`.weights`
(GPT-2's config and tensors by Hugging Face's names), :mod:`.tokenizer` (byte-level,
or a ``tokenizer.json``), :mod:`.model` (the forward pass, batched, with KV caches),
:mod:`.sampling`, :mod:`.engine` (the engine the service builds), and
:mod:`.random_weights` (writes a random model: ``python -m
quart_service.engines.neural.random_weights --help``).

This module imports nothing heavy, so the entry point always loads; numpy is needed
when a model uses the engine (``pip install 'quart_service[neural]'``).
"""

from ._entry import create

__all__ = ["create"]
