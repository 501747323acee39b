"""Weights once per host: workers' memory with the weights mapped vs copied, and the
neural engine's single-stream speed.

    python -m bench.shared_weights [--workers 4] [--layers 8 --embd 512 --heads 8]
                                   [--tokens 64] [--rounds 2]

Writes a random GPT-2 of that shape (8 x 512: about 100 MB of float32) in a temporary
folder and starts the service under Hypercorn with ``--workers`` workers. For each way
of loading (``mmap``: the file mapped read-only, shared through the page cache;
``copy``: a private copy in each worker), on a fresh server: every worker first runs
a one-layer model of the same width (numpy, OpenBLAS and their buffers loaded), then
one worker runs the model, then the others. Prints each worker's RSS, PSS and
anonymous memory, and what the model added to PSS: in one worker alone, and in all of
them together (their ratio is the issue's criterion: at most 1.3 with mmap; a copy
costs one per worker).

Then the model's speed on one stream: in a child process, ``--tokens`` greedy
decoding steps after a 16-token prompt (wall and CPU per token), with OpenBLAS
limited to one thread and with its default (a thread per core); and through the
server (``--blas-threads`` per worker, 0: OpenBLAS's default), one streamed completion
of ``--tokens`` tokens: tokens/s seen by the client, the worker's CPU per token (/proc).
The child also decodes 32 prompts together and each alone (30 greedy steps, the same
tokens fed to both) and prints how far batched logits drift and how often the
likeliest token differs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import numpy as np
import psutil

from quart_service.engines.neural.model import GPT2Model
from quart_service.engines.neural.random_weights import write_random_weights
from quart_service.engines.neural.weights import GPT2Config
from tests.support.data import wait_all
from tests.support.memory import Memory, load_one_by_one
from tests.support.server import Server, pinned_workers, running_server

TOKEN = "bench-admin-token"
MB = 1e6


def put_model(server: Server, name: str, parameters: dict[str, Any]) -> None:
    """Create a model row of the neural engine through the admin API."""
    response = httpx.post(
        server.url + "/admin/models",
        json={"name": name, "engine": "neural", "parameters": parameters},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    response.raise_for_status()


def _complete(client: httpx.Client, model: str, tokens: int = 2) -> None:
    body = {"model": model, "prompt": "We the People", "max_tokens": tokens, "temperature": 0}
    response = client.post("/v1/completions", json=body, timeout=300)
    response.raise_for_status()


def _row(label: str, m: Memory, mapped: Memory | None = None) -> str:
    line = (
        f"  {label:<22} RSS {m.rss / MB:7.1f}  PSS {m.pss / MB:7.1f}  anon {m.anonymous / MB:7.1f}"
    )
    if mapped is not None:
        line += f"   weights mapping: RSS {mapped.rss / MB:6.1f} PSS {mapped.pss / MB:6.1f}"
    return line


def _memory_round(folder: Path, weights: Path, warm: Path, workers: int, load: str) -> float:
    env = {
        "QUART_SERVICE_DATA_DIR": str(folder / f"data-{load}"),
        "QUART_SERVICE_REFRESH_INTERVAL": "0.5",
        "QUART_SERVICE_ADMIN_TOKEN": TOKEN,
    }
    with (
        running_server(folder, workers=workers, env=env) as server,
        pinned_workers(server, workers) as clients,
    ):
        put_model(server, "warm", {"weights": str(warm)})
        put_model(server, "model", {"weights": str(weights), "load": load})
        wait_all(clients, "/data", lambda a: {"warm", "model"} <= set(a["models"]), timeout=15)
        for client in clients.values():
            _complete(client, "warm")
        loading = load_one_by_one(
            list(clients), lambda pid: _complete(clients[pid], "model"), weights
        )
    before, after, mapped = loading.before, loading.after, loading.mapped
    alone, together = loading.alone, loading.together
    print(f"\nload={load}, {workers} workers (MB; after the model ran in every worker)")
    for n, pid in enumerate(clients):
        print(_row(f"worker {n} before", before[pid]))
        print(_row(f"worker {n} after", after[pid], mapped[pid]))
    total = Memory(
        *(sum(getattr(after[p], f) for p in clients) for f in ("rss", "pss", "anonymous"))
    )
    print(_row("all workers, summed", total))
    print(
        f"  PSS the model added: one worker alone {alone / MB:.1f} MB; all {workers} together "
        f"{together / MB:.1f} MB = {together / alone:.2f}x one worker's"
    )
    return together / alone


def _speed(weights: Path, tokens: int) -> None:
    """One stream's decoding speed in this process (run as a child: see _in_process_speed)."""
    model = GPT2Model.load(weights)
    rows = []
    for _ in range(3):
        state = model.new_state(list(range(32, 48)))
        wall = time.perf_counter()
        logits = model.forward([state])
        prefill = time.perf_counter() - wall
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(tokens):
            state.feed(int(logits[0].argmax()))
            logits = model.forward([state])
        rows.append(
            (prefill, (time.perf_counter() - wall) / tokens, (time.process_time() - cpu) / tokens)
        )
    prefill, per_token, cpu_token = (median(column) for column in zip(*rows, strict=True))
    print(
        f"  prefill of 16 tokens {prefill * 1e3:.1f} ms; decoding {1 / per_token:.1f} tokens/s "
        f"({per_token * 1e3:.1f} ms wall, {cpu_token * 1e3:.1f} ms CPU per token, all threads; "
        f"median of 3 x {tokens} tokens)",
        flush=True,
    )


def _batched_vs_alone(weights: Path, batch: int, steps: int) -> None:
    """Greedy decoding of ``batch`` prompts together and each alone, fed the same tokens:
    how far the logits of a row drift, and how often the likeliest token differs."""
    model = GPT2Model.load(weights)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 256, size=int(n))) for n in rng.integers(1, 40, size=batch)]
    together = [model.new_state(p) for p in prompts]
    alone = [model.new_state(p) for p in prompts]
    worst, differing, identical, rows = 0.0, 0, 0, 0
    for _ in range(steps):
        batched = model.forward(together)
        for i, state in enumerate(alone):
            single = model.forward([state])[0]
            worst = max(worst, float(np.abs(single - batched[i]).max()))
            identical += int(np.array_equal(single, batched[i]))
            differing += int(single.argmax() != batched[i].argmax())
            rows += 1
            token = int(single.argmax())
            state.feed(token)
            together[i].feed(token)
    print(
        f"  batched ({batch} states) vs alone, {rows} rows of logits: largest difference "
        f"{worst:.1e}, bit-identical rows {identical}, rows whose argmax differs {differing}",
        flush=True,
    )


def _in_process_speed(weights: Path, tokens: int) -> None:
    # A child per setting: OpenBLAS reads its thread count when numpy is imported.
    for threads in ("1", ""):
        env = {k: v for k, v in os.environ.items() if k not in _BLAS_VARIABLES}
        env.update(dict.fromkeys(_BLAS_VARIABLES, threads) if threads else {})
        label = "1 thread" if threads else f"OpenBLAS's default ({os.cpu_count()} threads)"
        print(f"\nin a process of its own, one stream, BLAS {label}:", flush=True)
        subprocess.run(
            [sys.executable, "-m", "bench.shared_weights", "--speed-of", str(weights),
             "--tokens", str(tokens)],
            env=env, check=True, timeout=600,
        )  # fmt: skip


_BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _served_speed(folder: Path, weights: Path, tokens: int, blas_threads: int) -> None:
    env = {
        **(dict.fromkeys(_BLAS_VARIABLES, str(blas_threads)) if blas_threads else {}),
        "QUART_SERVICE_DATA_DIR": str(folder / "data-speed"),
        "QUART_SERVICE_ADMIN_TOKEN": TOKEN,
        "QUART_SERVICE_REFRESH_INTERVAL": "0.5",
    }
    with running_server(folder, workers=1, env=env) as server, pinned_workers(server, 1) as clients:
        ((pid, client),) = clients.items()
        put_model(server, "model", {"weights": str(weights)})
        wait_all(clients, "/data", lambda a: "model" in a["models"], timeout=15)
        _complete(client, "model")  # builds the engine, faults the pages in
        worker = psutil.Process(pid)
        cpu = sum(worker.cpu_times()[:2])
        body = {
            "model": "model",
            "prompt": "We the People",
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
        }
        started = time.monotonic()
        first = 0.0
        count = -1  # the answer's first chunk is sent before any token
        with client.stream("POST", "/v1/completions", json=body, timeout=300) as reply:
            for line in reply.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["finish_reason"] is None:
                    count += 1
                    if count == 1:
                        first = time.monotonic() - started
        wall = time.monotonic() - started
        cpu = sum(worker.cpu_times()[:2]) - cpu
    print(
        f"\nserved, one stream (1 worker, BLAS threads {blas_threads or 'default'}): "
        f"{count} tokens in {wall:.2f} s = {count / wall:.1f} "
        f"tokens/s, first token {first * 1e3:.0f} ms, worker CPU {cpu / count * 1e3:.1f} ms "
        "per token"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--embd", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="memory rounds per load mode")
    parser.add_argument("--blas-threads", type=int, default=1, help="per served worker")
    parser.add_argument("--speed-of", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed_of:
        _speed(args.speed_of, args.tokens)
        _batched_vs_alone(args.speed_of, batch=32, steps=30)
        return
    config = GPT2Config(n_layer=args.layers, n_head=args.heads, n_embd=args.embd, vocab_size=256)
    warm_config = GPT2Config(n_layer=1, n_head=args.heads, n_embd=args.embd, vocab_size=256)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights, warm = folder / "model.safetensors", folder / "warm.safetensors"
        size = write_random_weights(weights, config, seed=1)
        write_random_weights(warm, warm_config, seed=2)
        print(f"model: {config}\n  {config.parameters:,} parameters, file {size / MB:.1f} MB")
        ratios: dict[str, list[float]] = {"mmap": [], "copy": []}
        for _ in range(args.rounds):
            for load in ratios:
                ratios[load].append(_memory_round(folder, weights, warm, args.workers, load))
        print(
            "\nsummed PSS added by the model / one worker's: "
            + "; ".join(f"{k} {', '.join(f'{r:.2f}x' for r in v)}" for k, v in ratios.items())
        )
        _in_process_speed(weights, args.tokens)
        _served_speed(folder, weights, args.tokens, args.blas_threads)
    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu = own.ru_utime + own.ru_stime
    print(f"this process's CPU (load generator and in-process runs): {cpu:.1f} s")


if __name__ == "__main__":
    main()
