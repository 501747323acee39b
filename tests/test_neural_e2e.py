"""The neural engine in real Hypercorn workers: one copy of the weights per host.

Issue 14: with 4 workers and a model of about 100 MB, the workers' summed PSS is at
most 1.3x one worker's, where a private copy per worker costs 4x. PSS counts a page
shared by N processes as 1/N in each, so the precise form is: the PSS the model adds
to the 4 workers together is at most 1.3x what it adds to one worker that loads it
alone (a private copy would add 4x). Measured from /proc/PID/smaps_rollup, and per
mapping from /proc/PID/smaps. bench/shared_weights.py prints the private-copy case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from quart_service.engines.neural.random_weights import write_random_weights
from quart_service.engines.neural.weights import GPT2Config

from .support.admin import create_model
from .support.data import wait_all
from .support.memory import load_one_by_one
from .support.server import pinned_workers, running_server

TOKEN = "test-admin-token"
# About 100 MB of float32: 8 layers of width 512 (a GPT-2 small is 12 of 768).
BIG = GPT2Config(n_layer=8, n_head=8, n_embd=512, vocab_size=256, n_ctx=1024)
# The same width, one layer: loads numpy and OpenBLAS and runs the same kernels first,
# so what the big model adds afterwards is the model.
WARM = GPT2Config(n_layer=1, n_head=8, n_embd=512, vocab_size=256, n_ctx=1024)


def _complete(client: httpx.Client, model: str) -> None:
    body = {"model": model, "prompt": "We the People", "max_tokens": 3, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.slow
def test_four_workers_hold_one_copy_of_a_100_mb_model(tmp_path: Path) -> None:
    big, warm = tmp_path / "big.safetensors", tmp_path / "warm.safetensors"
    size = write_random_weights(big, BIG, seed=1)
    write_random_weights(warm, WARM, seed=2)
    assert 95e6 < size < 110e6
    env = {
        "QUART_SERVICE_DATA_DIR": str(tmp_path / "data"),
        "QUART_SERVICE_REFRESH_INTERVAL": "0.5",
        "QUART_SERVICE_ADMIN_TOKEN": TOKEN,
    }
    with (
        running_server(tmp_path, workers=4, env=env) as server,
        pinned_workers(server, 4) as clients,
    ):
        models: dict[str, dict[str, Any]] = {
            "warm": {"weights": str(warm)},
            "big": {"weights": str(big)},
        }
        for name, parameters in models.items():
            create_model(server.url, TOKEN, name, "neural", parameters)
        wait_all(clients, "/data", lambda a: set(models) <= set(a["models"]), timeout=10)
        for client in clients.values():
            _complete(client, "warm")
        loading = load_one_by_one(list(clients), lambda pid: _complete(clients[pid], "big"), big)
    before, after, mappings = loading.before, loading.after, loading.mapped
    alone, together = loading.alone, loading.together

    mb = 1e6
    report = (
        f"model {size / mb:.1f} MB; PSS added: one worker alone {alone / mb:.1f} MB, "
        f"4 workers together {together / mb:.1f} MB; per worker: "
        + ", ".join(
            f"mapped RSS {m.rss / mb:.1f} PSS {m.pss / mb:.1f} anon +"
            f"{(after[pid].anonymous - before[pid].anonymous) / mb:.1f}"
            for pid, m in mappings.items()
        )
    )
    # Every worker computed with the whole model: its pages are resident in each.
    assert all(m.rss >= 0.9 * size for m in mappings.values()), report
    # Alone, a worker's PSS grows by the model (nobody shares it yet)...
    assert alone >= 0.9 * size, report
    # ...and four of them together add barely more: the criterion.
    assert together <= 1.3 * alone, report
    # The mapping's pages are counted once across the workers, not four times...
    assert sum(m.pss for m in mappings.values()) <= 1.05 * size, report
    # ...and no worker holds a private copy of the tensors.
    assert all(after[p].anonymous - before[p].anonymous < 0.1 * size for p in clients), report
