"""Every module of the package declares its public surface in `__all__`, and means it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import aisoc_plugind

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(aisoc_plugind.__path__, "aisoc_plugind.")
    if not info.name.endswith("__main__")
)


def _load(name: str) -> ModuleType:
    return importlib.import_module(name)


@pytest.mark.parametrize("name", MODULES)
def test_module_declares_all(name: str) -> None:
    """The module has an `__all__` whose every name exists."""
    module = _load(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{name} has no __all__ list"
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == []
    assert len(set(exported)) == len(exported)


@pytest.mark.parametrize("name", MODULES)
def test_public_definitions_are_exported(name: str) -> None:
    """Every public class and function defined in the module is in its `__all__`."""
    module = _load(name)
    defined = [
        n
        for n, value in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", None) == name
    ]
    assert sorted(set(defined) - set(module.__all__)) == []


def test_every_module_opens_with_a_one_line_job() -> None:
    """Each module's docstring starts with one sentence that names its job."""
    for name in [*MODULES, "aisoc_plugind"]:
        doc = inspect.getdoc(_load(name)) or ""
        first = doc.splitlines()[0] if doc else ""
        assert first.endswith(".") and len(first) <= 100, f"{name}: {first!r}"
