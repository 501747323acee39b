"""The access line written directly matches the one ``logging`` would write."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from quart_service.observability.access import ACCESS_LOGGER, FLUSH_AFTER, AccessLog
from quart_service.observability.logs import configure_logging, service_handler


@contextlib.contextmanager
def _alone() -> Iterator[io.StringIO]:
    """The service's own handler writing into a buffer, with no other handler around
    (pytest's capture handlers on the root logger are set aside meanwhile)."""
    root = logging.getLogger()
    parent = logging.getLogger("quart_service")
    saved_root, saved_parent = root.handlers[:], parent.handlers[:]
    root.handlers.clear()
    parent.handlers.clear()
    stream = io.StringIO()
    try:
        yield stream
    finally:
        parent.handlers[:] = saved_parent
        root.handlers[:] = saved_root


_CLIENT = 'client=10.0.0.7 ua="sdk \\"x\\"/1"'
# ISO 8601 to the millisecond, with the UTC offset.
_ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")


def _both_ways(fmt: str) -> tuple[str, str]:
    with _alone() as stream:
        return _write_both(fmt, stream)


def _write_both(fmt: str, stream: io.StringIO) -> tuple[str, str]:
    configure_logging("INFO", fmt)
    handler = service_handler(ACCESS_LOGGER)
    assert handler is not None
    handler.setStream(stream)
    AccessLog(fmt == "json").write(
        "GET", "/v1/models", "/v1/models", 200, 0.0021, 412, "req-1", "10.0.0.7", 'sdk "x"/1'
    )
    direct = stream.getvalue()
    fields = {"method": "GET", "path": "/v1/models", "route": "/v1/models", "status": 200}
    fields |= {"duration_ms": 2.1, "bytes": 412, "request_id": "req-1"}
    fields |= {"client": "10.0.0.7", "user_agent": 'sdk "x"/1'}
    ACCESS_LOGGER.info(
        f"GET /v1/models 200 2.1ms 412B id=req-1 {_CLIENT}",
        extra=fields if fmt == "json" else None,
    )
    return direct, stream.getvalue()[len(direct) :]


def test_text_line_is_the_logging_line() -> None:
    direct, logged = _both_ways("text")
    assert direct.endswith(
        f"] [INFO] quart_service.access: GET /v1/models 200 2.1ms 412B id=req-1 {_CLIENT}\n"
    )
    assert direct.split("] ", 2)[1:] == logged.split("] ", 2)[1:]


def test_json_line_has_the_logging_fields() -> None:
    direct, logged = _both_ways("json")
    ours, theirs = json.loads(direct), json.loads(logged)
    assert ours.keys() == theirs.keys()
    for key in ours.keys() - {"time"}:
        assert ours[key] == theirs[key], key
    assert ours["client"] == "10.0.0.7"
    assert ours["user_agent"] == 'sdk "x"/1'
    # Both ways write ISO 8601 times with milliseconds.
    assert _ISO_MS.match(ours["time"]), ours["time"]
    assert _ISO_MS.match(theirs["time"]), theirs["time"]


def test_lines_go_through_logging_when_something_else_listens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    configure_logging("INFO", "text")
    with caplog.at_level(logging.INFO, logger="quart_service.access"):
        assert logging.getLogger().handlers  # pytest's capture listens on the root
        assert service_handler(ACCESS_LOGGER) is None
        AccessLog(False).write("POST", "/x", "<unmatched>", 404, 0.001, 10, "abc")
    assert [r.getMessage() for r in caplog.records] == [
        'POST /x 404 1.0ms 10B id=abc client=- ua=""'
    ]


async def test_lines_are_written_in_batches_in_order_with_other_records() -> None:
    with _alone() as stream:
        configure_logging("INFO", "text")
        handler = service_handler(ACCESS_LOGGER)
        assert handler is not None
        handler.setStream(stream)
        access = AccessLog(False)
        for n in range(3):
            access.write("GET", f"/q{n}", "/q", 200, 0.001, 2, f"id-{n}")
        assert stream.getvalue() == "", "queued: the lines go out together"

        await asyncio.sleep(FLUSH_AFTER * 2)
        first = stream.getvalue()
        assert [line.split(": ", 1)[1].split()[1] for line in first.splitlines()] == [
            "/q0",
            "/q1",
            "/q2",
        ]

        # A record the handler writes takes the queued lines with it, first.
        access.write("GET", "/before", "/before", 200, 0.001, 2, "id-b")
        logging.getLogger("quart_service").warning("after the access line")
        later = stream.getvalue()[len(first) :].splitlines()
        assert len(later) == 2
        assert "GET /before 200" in later[0]
        assert "after the access line" in later[1]

        # Whatever is queued when the worker stops is written by the handler's flush
        # (logging.shutdown flushes every handler at exit).
        access.write("GET", "/last", "/last", 200, 0.001, 2, "id-l")
        handler.flush()
        assert stream.getvalue().endswith('GET /last 200 1.0ms 2B id=id-l client=- ua=""\n')
