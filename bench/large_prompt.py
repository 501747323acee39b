"""What one large prompt costs its worker, and whether the worker stays responsive.

    python -m bench.large_prompt [--megabytes 10] [--rounds 3] [--root PATH]

Starts the service under Hypercorn with one worker (so ``/livez`` is served by the
worker handling the prompt) and sends ``--rounds`` chat completions of a
``--megabytes`` MB prompt to the n-gram model (``max_tokens`` 2), one at a time,
while another connection polls ``/livez`` every 5 ms. Prints, per round:

- the worker's CPU for the request (/proc, user + system);
- ``/livez`` while the prompt is processed: p50 and worst latency, and how many;

then the worker CPU of a small chat completion (32 tokens), whole and streamed, over
200 requests each, and the load generator's own CPU. ``--root``: run another checkout
(e.g. a worktree of main) to compare.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.support.server import ROOT, pinned_workers, running_server

from .compare import cpu_seconds

__all__ = ["main"]

SMALL = {"model": "local-ngram", "messages": [{"role": "user", "content": "We the People"}],
         "max_tokens": 32, "seed": 1}  # fmt: skip


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _poll(probe: httpx.Client, latencies: list[float], done: threading.Event) -> None:
    while not done.is_set():
        started = time.monotonic()
        probe.get("/livez")
        latencies.append(time.monotonic() - started)
        time.sleep(0.005)


def main(argv: list[str] | None = None) -> None:
    """Run the measurement and print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    size = int(args.megabytes * 1_000_000)
    line = "We the People of the United States, in Order to form a more perfect Union, "
    prompt = (line * (size // len(line) + 1))[:size]
    big = json.dumps(
        {"model": "local-ngram", "messages": [{"role": "user", "content": prompt}],
         "max_tokens": 2}
    ).encode()  # fmt: skip
    own = _own_cpu()
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(Path(tmp), workers=1, root=args.root) as server,
        pinned_workers(server, 1) as clients,
    ):
        (probe,) = clients.values()
        (pid,) = server.worker_pids()
        probe.post("/v1/chat/completions", json=SMALL)  # the engine is built
        print(f"{args.root}: one worker, a {args.megabytes:g} MB chat prompt, n-gram model")
        for n in range(args.rounds):
            latencies: list[float] = []
            done = threading.Event()
            poller = threading.Thread(target=_poll, args=(probe, latencies, done))
            before = cpu_seconds(pid)
            poller.start()
            try:
                with httpx.Client(base_url=server.url, timeout=120) as client:
                    answer = client.post(
                        "/v1/chat/completions",
                        content=big,
                        headers={"Content-Type": "application/json"},
                    )
            finally:
                done.set()
                poller.join()
            cpu = cpu_seconds(pid) - before
            assert answer.status_code == 200, answer.text
            latencies.sort()
            print(
                f"  round {n + 1}: worker CPU {cpu * 1000:.0f} ms; /livez meanwhile: "
                f"p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
                f"worst {latencies[-1] * 1000:.1f} ms ({len(latencies)} probes)"
            )
        count = 200
        for stream in (False, True):
            before = cpu_seconds(pid)
            for _ in range(count):
                if stream:
                    body = {**SMALL, "stream": True}
                    with probe.stream("POST", "/v1/chat/completions", json=body) as reply:
                        for _ in reply.iter_lines():
                            pass
                else:
                    assert probe.post("/v1/chat/completions", json=SMALL).status_code == 200
            per = (cpu_seconds(pid) - before) / count
            kind = "streamed" if stream else "whole"
            print(f"  32-token chat, {kind}: worker CPU {per * 1000:.2f} ms per request")
    print(f"  load generator CPU: {_own_cpu() - own:.1f} s")


if __name__ == "__main__":
    main()
