"""The neural engine's model: the safetensors file mapped read-only, GPT-2's forward pass
checked against a plain float64 reference, the KV cache, batching, embeddings."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from quart_service.engines.neural.model import GPT2Model
from quart_service.engines.neural.random_weights import main, write_random_weights
from quart_service.engines.neural.safetensors_file import MappedSafetensors, write_safetensors
from quart_service.engines.neural.weights import GPT2Config, GPT2Weights, tensor_shapes
from quart_service.errors import EngineError

SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_ctx=96)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("neural") / "small.safetensors"
    write_random_weights(path, SMALL, seed=3)
    return path


@pytest.fixture(scope="module")
def model(weights_file: Path) -> GPT2Model:
    return GPT2Model.load(weights_file)


def _reference_logits(w: GPT2Weights, ids: list[int]) -> npt.NDArray[np.float64]:
    """GPT-2 written out plainly in float64, with no cache, batching or masks trick:
    every position's logits."""
    c = w.config
    d, heads = c.n_embd, c.n_head
    hd = d // heads

    def f(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return a.astype(np.float64)

    def norm(
        x: npt.NDArray[np.float64], g: npt.NDArray[np.float32], b: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float64]:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        out: npt.NDArray[np.float64] = (x - mu) / np.sqrt(var + c.layer_norm_epsilon) * f(g)
        return out + f(b)

    x = f(w.wte)[ids] + f(w.wpe)[: len(ids)]
    n = len(ids)
    for blk in w.blocks:
        qkv = norm(x, blk.ln_1_w, blk.ln_1_b) @ f(blk.attn_w) + f(blk.attn_b)
        out = np.zeros((n, d))
        for h in range(heads):
            q = qkv[:, h * hd : (h + 1) * hd]
            k = qkv[:, d + h * hd : d + (h + 1) * hd]
            v = qkv[:, 2 * d + h * hd : 2 * d + (h + 1) * hd]
            for i in range(n):
                s = k[: i + 1] @ q[i] / np.sqrt(hd)
                p = np.exp(s - s.max())
                out[i, h * hd : (h + 1) * hd] = (p / p.sum()) @ v[: i + 1]
        x = x + out @ f(blk.attn_proj_w) + f(blk.attn_proj_b)
        u = norm(x, blk.ln_2_w, blk.ln_2_b) @ f(blk.fc_w) + f(blk.fc_b)
        g = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
        x = x + g @ f(blk.fc_proj_w) + f(blk.fc_proj_b)
    result: npt.NDArray[np.float64] = norm(x, w.ln_f_w, w.ln_f_b) @ f(w.wte).T
    return result


def test_weights_are_read_only_views_of_one_mapping_of_the_file(model: GPT2Model) -> None:
    w = model.weights
    assert w.private_bytes == 0
    for array in (w.wte, w.wpe, w.blocks[0].attn_w, w.blocks[-1].fc_proj_w, w.ln_f_b):
        assert array.dtype == np.float32
        assert not array.flags.owndata
        assert not array.flags.writeable
        assert array.flags.aligned
    with pytest.raises(ValueError, match="read-only"):
        w.wte[0, 0] = 1.0
    assert w.metadata["tokenizer"] == "bytes"
    assert model.config == SMALL


def test_a_private_copy_on_request(weights_file: Path, model: GPT2Model) -> None:
    copied = GPT2Model.load(weights_file, copy=True)
    assert copied.weights.private_bytes == SMALL.parameters * 4
    assert copied.weights.wte.flags.owndata
    state_a, state_b = model.new_state([5, 6, 7]), copied.new_state([5, 6, 7])
    assert np.array_equal(model.forward([state_a]), copied.forward([state_b]))


def test_forward_matches_a_plain_float64_gpt2(model: GPT2Model) -> None:
    ids = [10, 200, 33, 7, 7, 7, 255, 0, 128]
    expected = _reference_logits(model.weights, ids)
    state = model.new_state(ids)
    logits = model.forward([state])
    assert logits.shape == (1, SMALL.vocab_size)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits[0], expected[-1], rtol=0, atol=2e-5)
    # And every later position, fed one token at a time through the cache.
    state = model.new_state(ids[:1])
    for i in range(1, len(ids)):
        np.testing.assert_allclose(model.forward([state])[0], expected[i - 1], atol=2e-5)
        state.feed(ids[i])


def test_a_prompt_in_one_go_equals_it_fed_token_by_token(model: GPT2Model) -> None:
    ids = list(range(40, 80))
    whole = model.forward([model.new_state(ids)])
    state = model.new_state(ids[:1])
    for token in ids[1:]:
        model.forward([state])
        state.feed(token)
    stepped = model.forward([state])
    assert state.length == len(ids)
    np.testing.assert_allclose(stepped, whole, rtol=0, atol=1e-5)
    assert int(stepped.argmax()) == int(whole.argmax())


def test_a_prompt_fed_in_chunks_equals_it_fed_whole(model: GPT2Model) -> None:
    """A long prompt fed a few tokens per forward (beside another state decoding)
    ends with the same cache length and last logits as the prompt fed at once."""
    ids = list(range(30, 97))
    whole = model.forward([model.new_state(ids)])
    chunked, other = model.new_state(ids), model.new_state([5])
    fed = []
    while chunked.pending:
        logits = model.forward([other, chunked], [1, 16])
        other.feed(int(logits[0].argmax()))
        fed.append(len(ids) - len(chunked.pending))
    assert fed == [16, 32, 48, 64, 67]
    assert chunked.length == len(ids)
    np.testing.assert_allclose(logits[1], whole[0], rtol=0, atol=1e-5)


def test_batched_decoding_equals_each_state_alone(model: GPT2Model) -> None:
    """Several states of different lengths in one forward: each row equals that state
    run alone. Row results may differ in the last bits (one row goes through BLAS's
    matrix-vector kernel, several through matrix-matrix), so compare with a tolerance,
    and count how often the likeliest token differs (docs/engines.md has the figure)."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 256, size=n)) for n in (1, 5, 17, 3, 30, 8, 2, 11)]
    batched = [model.new_state(p) for p in prompts]
    alone = [model.new_state(p) for p in prompts]
    worst, differing, steps = 0.0, 0, 0
    for _ in range(12):
        together = model.forward(batched)  # the prompts of all at once, then one token each
        for i, state in enumerate(alone):
            single = model.forward([state])[0]
            worst = max(worst, float(np.abs(single - together[i]).max()))
            differing += int(single.argmax() != together[i].argmax())
            steps += 1
            token = int(single.argmax())
            state.feed(token)
            batched[i].feed(token)  # the same token, so the sequences stay the same
    assert worst < 1e-4
    assert differing <= steps // 50, f"argmax differed in {differing} of {steps} rows"


def test_a_pass_stopped_between_layers_ends_as_forward_does(model: GPT2Model) -> None:
    """A pass that stops after every layer (a joining prompt's step runs in between,
    on other states) ends with the logits of an uninterrupted forward, bit for bit,
    and its states count the tokens only once it ends."""
    prompts = [[3, 1, 4], [1, 5], [9, 2, 6, 5]]
    plain = [model.new_state(p) for p in prompts]
    paused = [model.new_state(p) for p in prompts]
    for states in (plain, paused):
        for state, row in zip(states, model.forward(states), strict=True):
            state.feed(int(row.argmax()))
    expected = model.forward(plain)
    run = model.start(paused)
    stops = 0
    while (logits := run.run(lambda: True)) is None:
        stops += 1
        assert [s.length for s in paused] == [len(p) for p in prompts]
        model.forward([model.new_state([7, 7, 7])])  # another pass in between
    assert stops == SMALL.n_layer - 1
    np.testing.assert_array_equal(logits, expected)
    assert [s.length for s in paused] == [s.length for s in plain]


def test_a_batch_of_one_token_each_shares_one_matmul(model: GPT2Model) -> None:
    states = [model.new_state([i + 1]) for i in range(6)]
    logits = model.forward(states)
    assert logits.shape == (6, SMALL.vocab_size)
    assert [s.length for s in states] == [1] * 6
    assert all(not s.pending for s in states)
    assert model.forward([]).shape == (0, SMALL.vocab_size)


def test_the_context_bounds_a_state(model: GPT2Model) -> None:
    state = model.new_state([1] * SMALL.n_ctx)
    model.forward([state])
    assert state.cache_bytes == 2 * SMALL.n_layer * SMALL.n_ctx * SMALL.n_embd * 4
    state.feed(2)
    with pytest.raises(EngineError, match="context is full"):
        model.forward([state])
    with pytest.raises(EngineError, match="do not fit"):
        model.new_state([1] * (SMALL.n_ctx + 1))
    with pytest.raises(EngineError, match="at least one"):
        model.new_state([])
    with pytest.raises(EngineError, match=r"\[0, 300\)"):
        model.new_state([300])
    fed = model.new_state([1])
    model.forward([fed])
    with pytest.raises(EngineError, match="no pending"):
        model.forward([fed])
    fed.feed(3)
    with pytest.raises(EngineError, match="twice"):
        model.forward([fed, fed])


def test_embeddings_are_unit_mean_pooled_vectors(model: GPT2Model) -> None:
    batch = [[1, 2, 3], [4], list(range(200))]
    vectors = model.embed(batch)
    assert vectors.shape == (3, SMALL.n_embd)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    alone = model.embed([[4]])
    np.testing.assert_allclose(vectors[1], alone[0], atol=1e-5)
    assert vectors[2].shape == (SMALL.n_embd,)  # longer than the context: truncated
    assert model.embed([]).shape == (0, SMALL.n_embd)


def test_a_file_written_by_the_safetensors_package_loads_as_gpt2(
    tmp_path: Path, weights_file: Path
) -> None:
    """Real GPT-2 files: Hugging Face's names, maybe a ``transformer.`` prefix, the
    causal-mask buffers, no config in the metadata (GPT-2's is inferred), written by
    the reference implementation."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    config = GPT2Config(n_layer=2, n_head=2, n_embd=128, vocab_size=260, n_ctx=32)
    rng = np.random.default_rng(1)
    tensors = {
        "transformer." + name: (rng.standard_normal(shape) * 0.02).astype(np.float32)
        for name, shape in tensor_shapes(config).items()
    }
    tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), dtype=np.float32))
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(tensors, str(path), metadata={"format": "pt"})
    loaded = GPT2Model.load(path)
    assert loaded.config == config  # n_head from GPT-2's 64-dimension heads
    assert loaded.weights.private_bytes == 0
    np.testing.assert_array_equal(loaded.weights.wte, tensors["transformer.wte.weight"])
    # And ours reads back in the reference implementation.
    ours = safetensors_numpy.load_file(str(weights_file))
    assert set(ours) == set(tensor_shapes(SMALL))


def test_half_precision_weights_are_converted_to_a_private_float32_copy(tmp_path: Path) -> None:
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=256, n_ctx=8)
    rng = np.random.default_rng(2)
    tensors = {
        name: rng.standard_normal(shape).astype(np.float16)
        for name, shape in tensor_shapes(config).items()
    }
    path = tmp_path / "half.safetensors"
    write_safetensors(path, tensors, config.as_metadata())
    loaded = GPT2Model.load(path)
    assert loaded.weights.wte.dtype == np.float32
    assert loaded.weights.private_bytes == config.parameters * 4
    np.testing.assert_array_equal(loaded.weights.wte, tensors["wte.weight"].astype(np.float32))


def _raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"abc", "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "header of"),
        (struct.pack("<Q", 4) + b"{{{{", "bad JSON"),
    ],
)
def test_broken_files_are_refused_by_name(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(EngineError, match=message):
        MappedSafetensors(path)


def test_a_tensor_must_fit_its_byte_range(tmp_path: Path) -> None:
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}
    with pytest.raises(EngineError, match="does not fit"):
        MappedSafetensors(_raw_file(tmp_path / "a.safetensors", {"w": entry}, b"\0" * 16))
    with pytest.raises(EngineError, match="not supported"):
        MappedSafetensors(
            _raw_file(tmp_path / "b.safetensors", {"w": {**entry, "dtype": "F8_E4M3"}})
        )
    with pytest.raises(EngineError, match="cannot read"):
        MappedSafetensors(tmp_path / "missing.safetensors")
    with pytest.raises(EngineError, match=r"wte\.weight"):
        GPT2Model.load(_raw_file(tmp_path / "c.safetensors", {}))


def test_the_command_line_writes_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cli.safetensors"
    main([str(path), "--layers", "1", "--heads", "2", "--embd", "16", "--ctx", "32"])
    assert "parameters" in capsys.readouterr().out
    loaded = GPT2Model.load(path)
    assert loaded.config == GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=256, n_ctx=32)
    # The same seed writes the same file.
    again = tmp_path / "again.safetensors"
    main([str(again), "--layers", "1", "--heads", "2", "--embd", "16", "--ctx", "32"])
    assert again.read_bytes() == path.read_bytes()
