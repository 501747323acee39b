"""The exception tree drawn in errors.py is the tree the package has, and Retry-After
is rounded up the same way wherever an error is rendered."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest

import quart_service
from quart_service import errors
from quart_service.errors import ErrorAnswer, Overloaded, ServiceError, retry_after_header

_BRANCH = re.compile(r"^(?P<indent>[\s│]*)[├└]── (?P<name>\w+)")


def _drawn_tree() -> dict[str, str]:
    """Each class drawn in the docstring, with its parent (by indentation)."""
    assert errors.__doc__ is not None
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = [(-1, "ServiceError")]
    for line in errors.__doc__.splitlines():
        match = _BRANCH.match(line)
        if match is None:
            continue
        depth = len(match["indent"])
        while stack[-1][0] >= depth:
            stack.pop()
        parents[match["name"]] = stack[-1][1]
        stack.append((depth, match["name"]))
    return parents


def _every_subclass() -> dict[str, str]:
    """Every ServiceError subclass defined in the package, with its parent."""
    for info in pkgutil.walk_packages(quart_service.__path__, prefix="quart_service."):
        importlib.import_module(info.name)
    found: dict[str, str] = {}
    pending = [ServiceError]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("quart_service."):
                found[sub.__name__] = cls.__name__
                pending.append(sub)
    return found


def test_the_drawn_tree_is_the_real_tree() -> None:
    drawn, real = _drawn_tree(), _every_subclass()
    assert len(real) >= 13
    assert drawn == real


def test_every_subclass_lives_in_errors_py() -> None:
    for info in pkgutil.walk_packages(quart_service.__path__, prefix="quart_service."):
        importlib.import_module(info.name)
    stray = [
        f"{sub.__module__}.{sub.__name__}"
        for sub in _all(ServiceError)
        if sub.__module__.startswith("quart_service.") and sub.__module__ != errors.__name__
    ]
    assert stray == []


def _all(cls: type[ServiceError]) -> list[type[ServiceError]]:
    subs = cls.__subclasses__()
    return subs + [deeper for sub in subs for deeper in _all(sub)]


@pytest.mark.parametrize(
    ("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.4, "2"), (2.0, "2"), (5.01, "6")]
)
def test_retry_after_is_whole_seconds_rounded_up(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header
    for path in ("/v1/chat/completions", "/admin/models"):
        answer = ErrorAnswer.of(path, Overloaded("full", retry_after=seconds))
        assert answer.headers["Retry-After"] == header
