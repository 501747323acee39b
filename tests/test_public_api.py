"""The public surface is what ``__all__`` says, checked both ways in every module.

For every package: each name in ``__all__`` exists, and each public attribute that is
not a submodule is in ``__all__``. For every public module: it has ``__all__``, each
name in it exists, and each public name it defines (a function, a class, a constant)
is in it, so nothing public-looking is left undeclared.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import quart_service

from .support.server import server_env

PACKAGE_DIR = Path(quart_service.__file__).parent


def _public_modules() -> list[str]:
    names = ["quart_service"]
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="quart_service."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


PUBLIC_MODULES = _public_modules()
PACKAGES = [name for name in PUBLIC_MODULES if hasattr(importlib.import_module(name), "__path__")]


# Decorators that register a function where it is reached: a route, a hook, a command.
_HOOKS = {
    "route",
    "get",
    "post",
    "put",
    "patch",
    "delete",
    "before_request",
    "errorhandler",
    "command",
}


def _is_view(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A view (``@bp.get(...)``) or a command (``@main.command()``) is reached through
    what it is registered on, never imported."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr in _HOOKS:
            return True
    return False


def _defined_names(module: types.ModuleType) -> set[str]:
    """Public names a module defines at its top level (imports, views and type
    variables aside)."""
    tree = ast.parse(inspect.getsource(module))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _is_view(node):
            continue
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            value = node.value
            # T = TypeVar("T") is typing machinery, not the module's API.
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") in (
                "TypeVar",
                "ParamSpec",
            ):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {name for name in names if not name.startswith("_")}


def test_the_walk_finds_the_layers() -> None:
    expected = {
        "quart_service.engines",
        "quart_service.data",
        "quart_service.streaming",
        "quart_service.observability.metrics",
        "quart_service.server.cli",
        "quart_service.context",
    }
    assert expected <= set(PUBLIC_MODULES)


@pytest.mark.parametrize("name", PACKAGES)
def test_a_package_exports_exactly_all(name: str) -> None:
    package = importlib.import_module(name)
    declared = set(getattr(package, "__all__", ()))
    for attribute in declared:
        assert hasattr(package, attribute), f"{name}.__all__ names {attribute!r}, which is missing"
    exported = {
        attribute
        for attribute, value in vars(package).items()
        if not attribute.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported - declared == set(), f"{name} exports names missing from __all__"


@pytest.mark.parametrize("name", [n for n in PUBLIC_MODULES if n not in PACKAGES])
def test_every_public_name_of_a_module_is_declared(name: str) -> None:
    module = importlib.import_module(name)
    declared = getattr(module, "__all__", None)
    assert declared is not None, f"{name} has no __all__"
    for attribute in declared:
        assert hasattr(module, attribute), f"{name}.__all__ names {attribute!r}, which is missing"
    undeclared = _defined_names(module) - set(declared)
    assert undeclared == set(), f"{name}: public but not in __all__ (or make them private)"


def test_no_function_shadows_a_submodule() -> None:
    # `import quart_service.x as m` must give the module x, whatever the package exports.
    for name in PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.iter_modules(package.__path__):
            value = getattr(package, info.name, None)
            assert value is None or isinstance(value, types.ModuleType), f"{name}.{info.name}"


def test_importing_the_app_opens_no_thread_or_file() -> None:
    # Every spawned worker (and the test process) imports the app module: nothing may
    # start or open at import time (docs/design.md, pitfall 8).
    probe = (
        "import os, threading\n"
        "before = set(os.listdir('/proc/self/fd'))\n"
        "import quart_service.app\n"
        "after = set(os.listdir('/proc/self/fd'))\n"
        "print(threading.active_count(), len(after - before))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=server_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    threads, new_fds = map(int, result.stdout.split())
    assert threads == 1
    assert new_fds == 0
