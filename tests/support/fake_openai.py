"""A small real OpenAI-compatible server, run as its own process, for the ``upstream``
engine's tests: it answers as OpenAI does and records each body it received.

    python -m tests.support.fake_openai PORT

What it answers depends on the ``model`` it is sent:

* ``limited``: 429 with OpenAI's rate-limit error body and ``Retry-After: 7``;
* ``breaks``: a stream that sends one chunk, then drops the connection;
* anything else: a chat completion (``tool_calls`` when the request has ``tools``),
  streamed or whole; a text completion; an embedding.

``GET /last`` returns the last body it received, as it was sent.
"""

from __future__ import annotations

import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["main"]

_received: list[dict[str, Any]] = []


def _chat(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("tools"):
        name = body["tools"][0]["function"]["name"]
        call = {"id": "call_1", "type": "function",
                "function": {"name": name, "arguments": "{\"city\": \"Paris\"}"}}  # fmt: skip
        message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
        finish = "tool_calls"
    else:
        message, finish = {"role": "assistant", "content": "relayed"}, "stop"
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
        "model": body["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }  # fmt: skip


def _chunk(body: dict[str, Any], delta: dict[str, Any], finish: str | None) -> bytes:
    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
             "model": body["model"],
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, _received[-1] if _received else None)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _received.append(body)
        model = body.get("model")
        if model == "limited":
            error = {"message": "Rate limit reached for requests", "type": "requests",
                     "param": None, "code": "rate_limit_exceeded"}  # fmt: skip
            headers = {"Retry-After": "7", "x-ratelimit-remaining-requests": "0"}
            self._send(429, {"error": error}, headers)
            return
        if self.path.endswith("/embeddings"):
            vector = {"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}
            usage = {"prompt_tokens": 1, "total_tokens": 1}
            self._send(200, {"object": "list", "data": [vector], "model": model, "usage": usage})
            return
        if not body.get("stream"):
            self._send(200, _chat(body))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [_chunk(body, {"role": "assistant", "content": ""}, None),
                  _chunk(body, {"content": "relayed"}, None)]  # fmt: skip
        if model == "breaks":
            self._chunked(events[0])
            self.wfile.flush()
            # Gone mid-stream, without the chunked encoding's last chunk.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        for event in [*events, _chunk(body, {}, "stop"), b"data: [DONE]\n\n"]:
            self._chunked(event)
        self.wfile.write(b"0\r\n\r\n")

    def _chunked(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def main() -> None:
    """Serve on 127.0.0.1:PORT until killed."""
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), _Handler)
    server.daemon_threads = True
    print("serving", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
