"""One HTTP request, handled in the server's own task: Quart's connection, leaner.

Quart's ``ASGIHTTPConnection`` starts two tasks per request, one that runs the view
and sends the response, one that reads the request body and waits for the client to
leave, and waits on both with ``asyncio.wait``; a response with a deadline (Quart's
``RESPONSE_TIMEOUT``, every plain answer) is sent through ``asyncio.wait_for``, a
third task. Each task is a few hundred bytes kept for the request's life and a few
thousand instructions to start and to finish, paid on every request and held by
every open stream.

Here the view runs in the server's task that called the app, the reader is the one
task started, and a deadline is ``asyncio.timeout``, which starts none. A stream is
sent from :meth:`ServiceHTTPConnection.__call__` itself, its response dropped once
its head is sent: an open stream keeps every coroutine between the server and its
body, and what they hold, for its whole life. What the client sees is Quart's: the
body is read as it arrives, and when the client leaves, the reader cancels the view
where it waits (the view's ``finally`` blocks run; a stream's producer is closed),
and the request ends without an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol, cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPResponseStartEvent
from quart import Request, Response
from quart.asgi import ASGIHTTPConnection
from quart.debug import traceback_response
from quart.typing import ResponseTypes
from quart.utils import encode_headers

__all__ = ["SelfSendingBody", "ServiceHTTPConnection"]


class SelfSendingBody(Protocol):
    """A response body that sends itself (inside ``async with``), rather than being
    iterated chunk by chunk: a stream's per-event path is then one frame."""

    async def __aenter__(self) -> object:
        """Start the body (before :meth:`send_to`)."""

    async def __aexit__(self, *exc_info: object) -> object:
        """End the body, whether it was sent whole or not."""

    def send_to(self, send: ASGISendCallable) -> Awaitable[None]:
        """Send every chunk of the body with ``send`` (``more_body`` set)."""


class ServiceHTTPConnection(ASGIHTTPConnection):
    """Quart's HTTP connection with one task per request instead of three."""

    _left = False  # the reader ended (the client left, or receiving failed) and stopped the view
    _failure: BaseException | None = None  # why receiving failed

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        request = self._create_request_from_scope(send)
        task = asyncio.current_task()
        assert task is not None
        reader = asyncio.ensure_future(self._read(request, receive, task))
        try:
            response = await self._respond(request)
            deadline = self._deadline(response)
            body: SelfSendingBody | None = getattr(response, "response", None)
            if deadline is None and getattr(body, "send_to", None) is not None:
                # A stream (no deadline: sse() sets none) is sent in this coroutine,
                # not in two more: an open stream keeps every coroutine between the
                # server and its body, a quarter of a kilobyte each.
                assert body is not None
                await send(_start(response))
                del response  # sent: not kept (with its headers) for the stream's life
                async with body:
                    await body.send_to(send)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                try:
                    async with asyncio.timeout(deadline):
                        await self._send_response(send, response)
                except TimeoutError:
                    pass  # as Quart does: a response past its deadline stops where it was
        except asyncio.CancelledError:
            # Ours only if the reader cancelled us, and nobody else did too.
            if not self._left or task.uncancel() > 0:
                raise
        finally:
            reader.cancel()
        if self._failure is not None:
            raise self._failure

    async def _read(
        self, request: Request, receive: ASGIReceiveCallable, view: asyncio.Task[None]
    ) -> None:
        """Feed the body to ``request``; when the client leaves, stop ``view``."""
        try:
            # Quart's handle_messages, written here: one coroutine less per request.
            while True:
                message = await receive()
                if message["type"] == "http.request":
                    request.body.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        request.body.set_complete()
                elif message["type"] == "http.disconnect":
                    break
        except asyncio.CancelledError:
            raise  # the response is complete: the view stopped us
        except BaseException as error:  # receiving failed: stop the view, then raise it
            self._failure = error
        self._left = True
        view.cancel()

    async def _respond(self, request: Request) -> ResponseTypes:
        """The app's response to ``request`` (a traceback page in debug and testing)."""
        try:
            return await self.app.handle_request(request)
        except Exception as error:
            if not (self.app.debug or self.app.testing):
                raise
            return await traceback_response(error)

    async def _send_response(self, send: ASGISendCallable, response: ResponseTypes) -> None:
        """Quart's, except that a :class:`SelfSendingBody` sends itself."""
        body: SelfSendingBody | None = getattr(response, "response", None)
        if getattr(body, "send_to", None) is None:  # not a Protocol isinstance: too slow
            await super()._send_response(send, response)
        else:
            assert body is not None  # as in __call__, for a body with a deadline
            await send(_start(response))
            async with body:
                await body.send_to(send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _deadline(self, response: ResponseTypes) -> float | None:
        """How long the response may take to send (Quart's ``RESPONSE_TIMEOUT``, or
        the response's own ``timeout``); None: no limit."""
        if isinstance(response, Response) and response.timeout != Ellipsis:
            return cast(float | None, response.timeout)
        return cast(float | None, self.app.config["RESPONSE_TIMEOUT"])


def _start(response: ResponseTypes) -> HTTPResponseStartEvent:
    """The ``http.response.start`` message of ``response``."""
    return {
        "type": "http.response.start",
        "status": response.status_code,
        "headers": encode_headers(response.headers),
        "trailers": False,
    }
