"""A request body without two ``asyncio.Event`` objects per request.

Quart's request ``Body`` makes two ``asyncio.Event``s for every request, and each
Event makes a ``collections.deque`` for its waiters at once: 760 bytes a deque, most
of a kilobyte an Event, kept for the whole request. An open stream keeps its request,
so at 20,000 idle streams the two Events alone are about 32 MB of worker memory, nearly
always for a body that arrived whole before anyone waited on it (a ``GET`` has none).

:class:`Flag` is the part of an Event that ``Body`` uses, with its waiters made only
when someone waits; :class:`LeanBody` is Quart's ``Body`` with two of them.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from quart import Request
from quart.wrappers.request import Body
from werkzeug.exceptions import RequestEntityTooLarge

__all__ = ["Flag", "LeanBody", "ServiceRequest"]


class Flag:
    """``asyncio.Event``'s ``is_set``/``set``/``clear``/``wait``, whose waiting list
    exists only while someone waits."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return self._value

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        """Unset the flag: later waits wait again."""
        self._value = False

    async def wait(self) -> Literal[True]:
        """Return once the flag is set (at once if it is)."""
        if self._value:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        waiters = self._waiters
        waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in waiters:  # set() drops the whole list; a cancelled wait goes itself
                waiters.remove(waiter)
        return True


class LeanBody(Body):
    """Quart's request body, its two events being :class:`Flag` objects."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        # Quart's __init__ (0.22), without the two asyncio.Events it would make and
        # drop; tests/test_request_body.py checks the behaviour it keeps.
        self._data = bytearray()
        self._complete = Flag()  # type: ignore[assignment]  # Body uses only Flag's methods
        self._has_data = Flag()  # type: ignore[assignment]
        self._max_content_length = max_content_length
        self._must_raise: Exception | None = None
        if (
            expected_content_length is not None
            and max_content_length is not None
            and expected_content_length > max_content_length
        ):
            self._must_raise = RequestEntityTooLarge()


class ServiceRequest(Request):
    """Quart's request, with a :class:`LeanBody`."""

    body_class = LeanBody
