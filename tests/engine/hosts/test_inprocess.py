"""The in-process host: batch loading with per-plugin time limits, run limits, the importer.

Plugins here are real code imported from real verified bytes; hangs are real sleeps.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from aisoc_plugind.engine.bundle import Bundle
from aisoc_plugind.engine.hosts import LoadRequest
from aisoc_plugind.engine.hosts.inprocess import InProcessHost
from aisoc_plugind.engine.hosts.loader import NAMESPACE, import_bundle, takes_config
from aisoc_plugind.engine.scan import compile_sources
from aisoc_plugind.errors import PluginDError, PluginLoadError, PluginRunError, PluginTimeout

GOOD = "class Plugin:\n    def run(self, payload, context):\n        return {'ok': True}\n"


def _request(
    name: str, code: str, *, files: dict[str, str] | None = None, precompile: bool = False
) -> LoadRequest:
    sources = {"plugin.py": code.encode(), **{k: v.encode() for k, v in (files or {}).items()}}
    root = Path(f"/nonexistent/{name}")
    compiled = None
    if precompile:
        compiled = compile_sources(
            Bundle(
                path=root,
                manifest_name="plugin.yaml",
                manifest_bytes=b"",
                signature=None,
                sources=sources,
            )
        )
    return LoadRequest(
        plugin_id=name,
        version="1",
        root=root,
        sources=sources,
        entry_point="plugin.py",
        config={"k": "v"},
        group="g",
        code=compiled,
    )


def _code(text: str) -> str:
    return textwrap.dedent(text).lstrip()


def _ours() -> set[str]:
    return {n for n in sys.modules if n.startswith(NAMESPACE + ".")}


async def test_a_batch_loads_each_plugin_or_says_why() -> None:
    host = InProcessHost(timeout_s=0.5, concurrency=4)
    before = _ours()
    started = time.monotonic()
    outcomes = await host.load_many(
        [
            _request("a", GOOD),
            _request("hangs", "import time\ntime.sleep(3)\n" + GOOD),
            _request("b", GOOD, precompile=True),
            _request(
                "init",
                _code(
                    """
                    class Plugin:
                        def __init__(self):
                            raise ValueError("x")
                        def run(self, p, c):
                            return 1
                    """
                ),
            ),
            _request(
                "setup",
                _code(
                    """
                    class Plugin:
                        def setup(self):
                            raise RuntimeError("no")
                        def run(self, p, c):
                            return 1
                    """
                ),
            ),
            _request("syntax", "def broken(:\n"),
            _request("noclass", "X = 1\n"),
        ]
    )
    elapsed = time.monotonic() - started
    codes = [o.code if isinstance(o, PluginDError) else "ok" for o in outcomes]
    assert codes == [
        "ok",
        "plugin_load_timeout",
        "ok",
        "plugin_init_failed",
        "plugin_setup_failed",
        "plugin_import_failed",
        "plugin_class_missing",
    ]
    assert elapsed < 2.5  # the hung import was abandoned after ~0.5 s, the rest went on
    for outcome in outcomes:
        if not isinstance(outcome, PluginDError):
            assert (await outcome.run({}, {})).value == {"ok": True}
            await outcome.teardown()
    await anyio.sleep(3)  # the abandoned import finishes now: what it built is released
    assert _ours() == before


async def test_a_single_load_times_out_too() -> None:
    host = InProcessHost(timeout_s=0.3, concurrency=2)
    with pytest.raises(PluginLoadError) as caught:
        await host.load(_request("slow", "import time\ntime.sleep(1)\n" + GOOD))
    assert caught.value.code == "plugin_load_timeout"


async def test_async_run_limits_are_enforced() -> None:
    """An async run past the limit ends in PluginTimeout, also when the plugin swallows the
    cancellation; a cancellation from outside stays a cancellation."""
    host = InProcessHost(timeout_s=0.3, concurrency=2)
    sleepy = await host.load(
        _request(
            "sleepy",
            _code(
                """
                import asyncio
                class Plugin:
                    async def run(self, p, c):
                        await asyncio.sleep(5)
                """
            ),
        )
    )
    stubborn = await host.load(
        _request(
            "stubborn",
            "import asyncio\nclass Plugin:\n    async def run(self, p, c):\n        try:\n"
            "            await asyncio.sleep(5)\n        except asyncio.CancelledError:\n"
            "            return {'swallowed': True}\n",
        )
    )
    failing = await host.load(
        _request(
            "failing",
            _code(
                """
                class Plugin:
                    async def run(self, p, c):
                        raise KeyError("secret payload value")
                """
            ),
        )
    )
    for plugin in (sleepy, stubborn):
        started = time.monotonic()
        with pytest.raises(PluginTimeout):
            await plugin.run({}, {})
        assert time.monotonic() - started < 1.0
    with pytest.raises(PluginRunError):
        await failing.run({}, {})
    task = asyncio.ensure_future(sleepy.run({}, {}))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Many concurrent runs share a few timers and all end on time.
    started = time.monotonic()
    results = await asyncio.gather(*(sleepy.run({}, {}) for _ in range(50)), return_exceptions=True)
    assert all(isinstance(r, PluginTimeout) for r in results)
    assert time.monotonic() - started < 1.0
    for plugin in (sleepy, stubborn, failing):
        await plugin.teardown()


async def test_a_sync_run_limit_is_enforced() -> None:
    host = InProcessHost(timeout_s=0.3, concurrency=2)
    slow = await host.load(
        _request(
            "slowsync",
            "import time\nclass Plugin:\n    def run(self, p, c):\n        time.sleep(2)\n",
        )
    )
    with pytest.raises(PluginTimeout):
        await slow.run({}, {})
    await slow.teardown()


def test_plugin_config_is_passed_when_init_takes_it() -> None:
    class NoInit:
        pass

    class Takes:
        def __init__(self, config: object) -> None:
            pass

    class Star:
        def __init__(self, *args: object) -> None:
            pass

    class KeywordOnly:
        def __init__(self, *, k: int = 1) -> None:
            pass

    class Meta(type):
        pass

    class WithMeta(metaclass=Meta):
        def __init__(self, config: object) -> None:
            pass

    class New:
        def __new__(cls, config: object) -> New:
            return object.__new__(cls)

    assert [takes_config(c) for c in (NoInit, Takes, Star, KeywordOnly, WithMeta, New)] == [
        False,
        True,
        True,
        False,
        True,
        True,
    ]


@pytest.mark.parametrize("precompile", [False, True])
def test_the_flat_import_matches_importlib(precompile: bool) -> None:
    """A bundle without __init__.py imports its entry as importlib would (name, package,
    spec, file, relative imports of sibling modules), and release() forgets every module."""
    flat = _request(
        "flat",
        _code(
            """
            from . import helper
            from .helper import VALUE
            class Plugin:
                def run(self, p, c):
                    return VALUE
            """
        ),
        files={"helper.py": "VALUE = 42\n"},
        precompile=precompile,
    )
    packaged = _request(
        "packaged",
        flat.sources["plugin.py"].decode(),
        files={"helper.py": "VALUE = 42\n", "__init__.py": ""},
        precompile=precompile,
    )
    shapes = []
    for request in (flat, packaged):
        imported = import_bundle(request.root, request.sources, request.entry_point, request.code)
        module = imported.module
        package = sys.modules[imported.package]
        assert module.__name__ == f"{imported.package}.plugin"
        assert module.__package__ == imported.package
        assert module.__spec__ is not None and module.__spec__.name == module.__name__
        assert module.__file__ == str(request.root / "plugin.py")
        assert sys.modules[module.__name__] is module
        assert getattr(package, "plugin") is module
        assert module.VALUE == 42 and module.helper.VALUE == 42
        origin = Path(module.__spec__.origin or "").relative_to(request.root)
        shapes.append((origin, module.__spec__.has_location, hasattr(package, "__path__")))
        imported.release()
        assert not [n for n in sys.modules if n.startswith(imported.package)]
    assert shapes[0] == shapes[1]


def test_a_failed_flat_import_leaves_nothing_behind() -> None:
    request = _request("boom", "raise RuntimeError('at import')\n")
    before = _ours()
    with pytest.raises(RuntimeError):
        import_bundle(request.root, request.sources, request.entry_point, None)
    assert _ours() == before
