"""Plugin faults of every kind at every entry point, in both hosts, in this process.

`engine.hosts.faults` tells a plugin's exceptions from the daemon's own cancellation and
describes them safely; the in-process host and the host runtime (driven over a socketpair, as
in test_runtime) turn every kind at every entry point into its coded error. The live-daemon
version of this matrix is tests/hardening/test_exceptions.py; this one is measured by coverage.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from aisoc_plugind.core.redact import MARK, Redactor
from aisoc_plugind.engine.hosts import LoadRequest
from aisoc_plugind.engine.hosts import runtime as host_runtime
from aisoc_plugind.engine.hosts.faults import (
    Raised,
    cancelled_here,
    captured,
    describe,
    type_name,
)
from aisoc_plugind.engine.hosts.inprocess import InProcessHost, call_hook
from aisoc_plugind.engine.hosts.protocol import Kind
from aisoc_plugind.errors import (
    PluginDError,
    PluginLoadError,
    PluginResultInvalid,
    PluginRunError,
    PluginTimeout,
)
from tests.engine.hosts.test_runtime import Supervisor
from tests.hardening.test_exceptions import KINDS, LOADS, RUNS, TEARDOWNS, plugin_code

# ---- faults ----------------------------------------------------------------------------------


def test_a_cancellation_is_ours_only_while_one_is_pending() -> None:
    """A CancelledError raised by code is not ours; one delivered by cancel() is."""

    async def main() -> list[bool]:
        seen: list[bool] = []
        try:
            raise asyncio.CancelledError
        except asyncio.CancelledError as exc:
            seen.append(cancelled_here(exc))
        with anyio.move_on_after(0.01):
            try:
                await anyio.sleep(5)
            except asyncio.CancelledError as exc:
                seen.append(cancelled_here(exc))
                raise
        seen.append(cancelled_here(ValueError()))
        return seen

    assert anyio.run(main) == [False, True, False]
    assert cancelled_here(asyncio.CancelledError()) is False  # no loop in this thread


def test_type_names_are_plain_names() -> None:
    """A class name that is no identifier (or absurdly long) is reported as `Exception`."""
    odd = type("not a name", (Exception,), {})
    long = type("X" * 100, (Exception,), {})
    assert type_name(odd()) == "Exception"
    assert type_name(long()) == "Exception"
    assert type_name(KeyError()) == "KeyError"


def test_describe_survives_any_str() -> None:
    """A `__str__` that raises, returns a str subclass or returns megabytes is described."""

    class Raising(Exception):
        def __str__(self) -> str:
            raise SystemExit(1)

    class Sneaky(str):
        def __getitem__(self, key: Any) -> str:
            raise KeyboardInterrupt

    class Subclassed(Exception):
        def __str__(self) -> str:
            return Sneaky("sneaky text")

    class Huge(Exception):
        def __str__(self) -> str:
            return "h" * 5_000_000

    assert describe(Raising()) == "Raising: <unprintable>"
    assert describe(Subclassed()) == "Subclassed: sneaky text"
    assert len(describe(Huge())) <= 501
    assert describe(GeneratorExit()) == "GeneratorExit"
    assert describe(ValueError("tok-secret-1"), Redactor(["tok-secret-1"])) == f"ValueError: {MARK}"


def test_captured_hands_back_what_a_call_raised() -> None:
    """`captured` turns any exception into a `Raised` value and passes results through."""

    def boom() -> int:
        raise asyncio.CancelledError

    outcome = captured(boom)()
    assert isinstance(outcome, Raised) and isinstance(outcome.exc, asyncio.CancelledError)
    assert captured(lambda: 5)() == 5


# ---- the in-process host -------------------------------------------------------------------


def _request(plugin_id: str, code: str, config: dict[str, Any] | None = None) -> LoadRequest:
    return LoadRequest(
        plugin_id=plugin_id,
        version="1",
        root=Path(f"/nonexistent/{plugin_id}"),
        sources={"plugin.py": code.encode()},
        entry_point="plugin.py",
        config=config or {},
        group="g",
    )


@pytest.mark.parametrize("where", list(LOADS))
@pytest.mark.parametrize("kind", list(KINDS))
async def test_in_process_loads_code_every_kind(kind: str, where: str) -> None:
    """Alone and in a batch, a load that raises anything ends in the step's code."""
    host = InProcessHost(timeout_s=5, concurrency=2)
    with pytest.raises(PluginLoadError) as caught:
        await host.load(_request(f"{kind}-{where}", plugin_code(kind, where)))
    assert caught.value.code == LOADS[where]
    outcomes = await host.load_many(
        [_request("bad", plugin_code(kind, where)), _request("good", plugin_code(None, None))]
    )
    assert isinstance(outcomes[0], PluginDError) and outcomes[0].code == LOADS[where]
    assert not isinstance(outcomes[1], PluginDError)
    await outcomes[1].teardown()


@pytest.mark.parametrize("where", RUNS)
@pytest.mark.parametrize("kind", list(KINDS))
async def test_in_process_runs_code_every_kind(kind: str, where: str) -> None:
    """A run that raises anything is a PluginRunError naming the type; the plugin runs on."""
    host = InProcessHost(timeout_s=5, concurrency=2)
    plugin = await host.load(_request("p", plugin_code(kind, where)))
    for _ in range(2):
        with pytest.raises(PluginRunError) as caught:
            await plugin.run({}, {})
        assert caught.value.message == f"plugin raised {KINDS[kind][1]}"
        assert caught.value.fault == KINDS[kind][1]
    await plugin.teardown()


@pytest.mark.parametrize("where", TEARDOWNS)
@pytest.mark.parametrize("kind", list(KINDS))
async def test_in_process_teardowns_code_every_kind(kind: str, where: str) -> None:
    """A teardown that raises anything is `plugin_teardown_failed`."""
    host = InProcessHost(timeout_s=5, concurrency=2)
    plugin = await host.load(_request("p", plugin_code(kind, where)))
    with pytest.raises(PluginLoadError) as caught:
        await plugin.teardown()
    assert caught.value.code == "plugin_teardown_failed"


ODD_RUNS = """
import asyncio
class Items(dict):
    def items(self):
        raise SystemExit("encode me")
class Sly:
    @property
    def __class__(self):
        raise KeyboardInterrupt
class Plugin:
    def __init__(self, config):
        self.config = config
    def run(self, payload, context):
        what = payload.get("do")
        if what == "items":
            return Items(a=1)
        if what == "class":
            return Sly()
        if what == "awaitable":
            async def later():
                raise asyncio.CancelledError()
            return later()
        if what == "slow":
            async def later():
                await asyncio.sleep(5)
            return later()
        return {"ok": True}
"""


@pytest.mark.parametrize(
    ("do", "error", "code"),
    [
        ("items", PluginResultInvalid, "plugin_result_invalid"),
        ("class", PluginRunError, "plugin_error"),  # raises when looked at
        ("awaitable", PluginRunError, "plugin_error"),
        ("slow", PluginTimeout, "plugin_timeout"),
    ],
)
async def test_in_process_results_and_awaitables_are_coded(
    do: str, error: type[PluginDError], code: str
) -> None:
    """Encoding a result runs plugin code too; an awaitable a sync run returns is awaited
    under the same rules."""
    host = InProcessHost(timeout_s=0.5, concurrency=2)
    plugin = await host.load(_request("odd", ODD_RUNS))
    with pytest.raises(error) as caught:
        await plugin.run({"do": do}, {})
    assert caught.value.code == code
    assert (await plugin.run({}, {})).value == {"ok": True}
    await plugin.teardown()


async def test_a_hook_that_swallows_its_time_limit_still_times_out() -> None:
    """A hook that catches the cancellation and returns has still overrun."""

    class Stubborn:
        async def setup(self) -> None:
            try:
                await anyio.sleep(5)
            except asyncio.CancelledError:
                return

    with pytest.raises(PluginLoadError) as caught:
        await call_hook(Stubborn(), "setup", "plugin_setup_failed", 0.05)
    assert "did not return within" in caught.value.message


async def test_a_hook_cancelled_from_outside_stays_cancelled() -> None:
    """Shutdown cancelling a hook is not the plugin's fault: the cancellation passes."""

    class Slow:
        async def teardown(self) -> None:
            await anyio.sleep(5)

    with anyio.move_on_after(0.05) as scope:
        await call_hook(Slow(), "teardown", "plugin_teardown_failed", 5)
    assert scope.cancelled_caught


async def test_in_process_errors_are_redacted_with_the_plugins_config() -> None:
    """What a plugin's hooks raise is redacted with its own configuration values."""
    code = (
        "class Plugin:\n    def __init__(self, config):\n        self.c = config\n"
        "    def run(self, p, c):\n        return {}\n"
        "    def teardown(self):\n        raise ValueError(self.c['token'])\n"
    )
    host = InProcessHost(timeout_s=5, concurrency=2)
    plugin = await host.load(_request("r", code, {"token": "in-process-secret"}))
    with pytest.raises(PluginLoadError) as caught:
        await plugin.teardown()
    assert caught.value.message == f"teardown() raised ValueError: {MARK}"


# ---- the host runtime, over a socketpair -------------------------------------------------


@pytest.fixture
def served() -> Iterator[Supervisor]:
    """A host runtime serving one end of a socketpair on a thread; the test has the other."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    options = host_runtime.HostOptions(max_result_bytes=4096, concurrency=2)
    thread = threading.Thread(target=host_runtime.serve, args=(theirs, options, {}), daemon=True)
    thread.start()
    supervisor = Supervisor(ours)
    assert supervisor.read().kind is Kind.HELLO
    try:
        yield supervisor
    finally:
        ours.close()
        thread.join(10)
        theirs.close()


@pytest.mark.parametrize("where", list(LOADS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_host_codes_every_kind_at_load(served: Supervisor, kind: str, where: str) -> None:
    """LOAD answers ERROR with the step's code, redacted; the host serves on."""
    answer = served.load("k", {"plugin.py": plugin_code(kind, where)}, config={"t": "host-secret"})
    assert (answer.kind, answer.header["code"]) == (Kind.ERROR, LOADS[where])
    assert "host-secret" not in answer.header["message"]
    assert served.load("ok", {"plugin.py": plugin_code(None, None)}).kind is Kind.LOADED


@pytest.mark.parametrize("where", RUNS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_host_codes_every_kind_at_run(served: Supervisor, kind: str, where: str) -> None:
    """RUN answers `plugin_error` with the type as `fault` and no text of the exception."""
    assert served.load("k", {"plugin.py": plugin_code(kind, where)}).kind is Kind.LOADED
    answer = served.run("k", {})
    assert (answer.kind, answer.header["code"]) == (Kind.ERROR, "plugin_error")
    assert answer.header["fault"] == KINDS[kind][1]
    assert answer.header["message"] == f"plugin raised {KINDS[kind][1]}"


@pytest.mark.parametrize("where", TEARDOWNS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_host_codes_every_kind_at_teardown(served: Supervisor, kind: str, where: str) -> None:
    """TEARDOWN answers `plugin_teardown_failed`; the plugin is gone all the same."""
    assert served.load("k", {"plugin.py": plugin_code(kind, where)}).kind is Kind.LOADED
    answer = served.call(Kind.TEARDOWN, {"key": "k"})
    assert (answer.kind, answer.header["code"]) == (Kind.ERROR, "plugin_teardown_failed")
    assert served.run("k", {}).header["code"] == "plugin_not_loaded"


@pytest.mark.parametrize(
    ("do", "code"),
    [
        ("items", "plugin_result_invalid"),
        ("class", "plugin_error"),
        ("awaitable", "plugin_error"),
    ],
)
def test_the_host_codes_results_that_run_code(served: Supervisor, do: str, code: str) -> None:
    """Encoding a result that runs plugin code, or an awaitable that raises, is coded."""
    assert served.load("odd", {"plugin.py": ODD_RUNS}).kind is Kind.LOADED
    answer = served.run("odd", {"do": do})
    assert (answer.kind, answer.header["code"]) == (Kind.ERROR, code)
