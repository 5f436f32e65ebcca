"""The shutdown's parts, in process: the plan, cutting runs, bounded teardowns, killed hosts,
held signals, and the service's stop and start-failure paths."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from aisoc_plugind.audit.schemas import to_ecs
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.engine.shutdown import ShutdownPlan
from aisoc_plugind.errors import ConfigError, DaemonStopping, PluginDError
from aisoc_plugind.service import signals
from aisoc_plugind.service.components import api_component
from aisoc_plugind.service.daemon import Component, HangupHook, Service, _failure
from tests.api_fixtures import write_tokens
from tests.conftest import Env, ManagerFactory, PluginFactory

HUNG_ASYNC_RUN = """
import asyncio

class Plugin:
    async def run(self, payload, context):
        await asyncio.sleep(3600)
"""

BLOCKING_SYNC_TEARDOWN = """
import time

class Plugin:
    def run(self, payload, context):
        return {}

    def teardown(self):
        time.sleep(5)
"""

HUNG_ASYNC_TEARDOWN = """
import asyncio

class Plugin:
    def run(self, payload, context):
        return {}

    async def teardown(self):
        await asyncio.sleep(3600)
"""

QUICK_TEARDOWN = """
class Plugin:
    def run(self, payload, context):
        return {}

    def teardown(self):
        pass
"""


def _plan(grace_s: float, drain_s: float, teardown_s: float) -> ShutdownPlan:
    now = time.monotonic()
    return ShutdownPlan(
        started=now, drain_until=now + drain_s, teardown_until=now + teardown_s, end=now + grace_s
    )


# The plan.


@pytest.mark.parametrize(
    ("grace", "run_timeout", "drain", "teardown"),
    [
        (20.0, 30.0, 13.0, 18.0),  # final 2 s (a tenth, at most 2), teardowns 5 s (a quarter)
        (4.0, 60.0, 2.5, 3.5),  # final 0.5 s (at least), teardowns 1 s
        (20.0, 1.0, 17.0, 18.0),  # teardowns never get more than their own time limit
        (0.8, 30.0, 0.2, 0.4),  # final: never more than half the grace
    ],
)
def test_the_plan_splits_the_grace_into_steps(
    grace: float, run_timeout: float, drain: float, teardown: float
) -> None:
    """Drain, teardowns and the last step fit in the grace, in this order."""
    plan = ShutdownPlan.starting(grace_s=grace, run_timeout_s=run_timeout, now=100.0)
    assert plan.started == 100.0
    assert plan.drain_until == pytest.approx(100.0 + drain)
    assert plan.teardown_until == pytest.approx(100.0 + teardown)
    assert plan.end == 100.0 + grace


def test_the_time_left_is_never_negative() -> None:
    """A deadline that has passed leaves 0 s."""
    plan = ShutdownPlan.starting(grace_s=1.0, run_timeout_s=1.0, now=time.monotonic() - 10)
    assert plan.remaining(plan.end) == 0.0
    assert ShutdownPlan.starting(grace_s=5.0, run_timeout_s=1.0).remaining(time.monotonic()) == 0


# Runs cut, teardowns bounded (the manager).


async def test_a_run_in_flight_is_cut_at_the_drain_deadline(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """A hung run is cut when the drain period ends: DaemonStopping, audited as such; a run
    asked for after the shutdown began is refused the same way."""
    plugins.write("hung", code=HUNG_ASYNC_RUN)
    manager: PluginManager = await make_manager(isolation_mode="none", run_timeout_s=60)
    await manager.discover()
    outcome: dict[str, BaseException] = {}

    async def call() -> None:
        try:
            await manager.run("test.hung")
        except PluginDError as exc:
            outcome["run"] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(5):
            while manager.inflight == 0:
                await anyio.sleep(0.01)
        manager.begin_shutdown(_plan(5.0, 0.3, 4.0))
        with pytest.raises(DaemonStopping):
            await manager.run("test.hung")
        started = time.monotonic()
        assert await manager.drain() == 1
        assert time.monotonic() - started < 3
    assert isinstance(outcome["run"], DaemonStopping)
    assert outcome["run"].code == "daemon_stopping"
    failed = [e for e in env.audit_events() if e["event"] == "plugin.run.failed"]
    assert [e["error_code"] for e in failed] == ["daemon_stopping", "daemon_stopping"]
    assert await manager.drain() == 0  # nothing left: a second drain returns at once


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_teardowns_run_at_once_and_are_cut_at_their_deadline(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory, isolation: str
) -> None:
    """Closing the manager tears every plugin down concurrently; those still running at the
    plan's teardown deadline are reported, and the close ends by the plan's end (hosts
    killed)."""
    plugins.write("sync", code=BLOCKING_SYNC_TEARDOWN)
    plugins.write("async", code=HUNG_ASYNC_TEARDOWN)
    plugins.write("quick", code=QUICK_TEARDOWN)
    manager: PluginManager = await make_manager(
        isolation_mode=isolation, isolation_group="plugin", run_timeout_s=60
    )
    await manager.discover()
    hosts = [manager.host_of(f"test.{n}") for n in ("sync", "async", "quick")]
    manager.begin_shutdown(_plan(2.0, 0.0, 1.0))
    started = time.monotonic()
    await manager.__aexit__(None, None, None)
    assert time.monotonic() - started < 2.0 + 0.5
    failed = {e["plugin_id"] for e in env.audit_events() if e["event"] == "plugin.teardown.failed"}
    assert failed == {"test.sync", "test.async"}
    if isolation == "process":
        for host in hosts:
            assert host is not None
            with anyio.fail_after(5):
                while _alive(host.pid):
                    await anyio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in text


async def test_a_manager_closed_without_a_plan_takes_the_grace_at_most(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory
) -> None:
    """Outside a daemon (no shutdown begun), closing still ends within the grace."""
    plugins.write("async", code=HUNG_ASYNC_TEARDOWN)
    manager: PluginManager = await make_manager(
        isolation_mode="none", shutdown_grace_s=1.0, run_timeout_s=60
    )
    await manager.discover()
    started = time.monotonic()
    await manager.__aexit__(None, None, None)
    assert time.monotonic() - started < 1.0 + 0.5


# Held signals.


def test_held_signals_are_recorded_and_replayed_in_order(handlers: None) -> None:
    """While held, SIGHUP and SIGTERM do nothing but get recorded, oldest first."""
    previous = signals.hold()
    assert signals.held()
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while len(taken := signals.take()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [h.signum for h in taken] == [signal.SIGHUP, signal.SIGTERM]
    assert taken[0].at <= taken[1].at
    assert signals.take() == []
    signals.restore(previous)
    assert not signals.held()
    assert signal.getsignal(signal.SIGTERM) == previous[signal.SIGTERM]


def test_holding_outside_the_main_thread_does_nothing(handlers: None) -> None:
    """Signals go to the main thread: another thread holds nothing."""
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(previous=signals.hold()))
    thread.start()
    thread.join()
    assert box["previous"] == {}


# The service.


def _events(service: Service) -> list[dict[str, Any]]:
    path = service.settings.audit_path
    return [json.loads(line) for line in path.read_text().splitlines()]


def _names(service: Service) -> list[str]:
    return [e["event"] for e in _events(service)]


def _failing(exc: BaseException | None) -> Component:
    """Return a component that raises `exc` as it starts."""

    @asynccontextmanager
    async def component(
        service: Service, manager: PluginManager
    ) -> AsyncIterator[HangupHook | None]:
        if exc is not None:
            raise exc
        yield None

    return component


_refusing = _failing(ConfigError("cannot listen on 127.0.0.1:1: taken", code="listen_failed"))
_broken = _failing(RuntimeError("a bug"))


@asynccontextmanager
async def _hup_on_start(
    service: Service, manager: PluginManager
) -> AsyncIterator[HangupHook | None]:
    os.kill(os.getpid(), signal.SIGHUP)  # during startup: the receiver listens already
    await anyio.sleep(0.1)
    yield None


def test_a_stop_requested_before_the_run_skips_the_startup(env: Env) -> None:
    """request_stop() first: run() opens and closes the trail, never ready."""
    service = Service(env.settings(isolation_mode="none"), stream=io.StringIO())
    service.request_stop("test")
    service.request_stop("ignored")  # the first request counts
    anyio.run(service.run)
    names = _names(service)
    assert names[0] == "daemon.started" and names[-1] == "daemon.stopped"
    assert "daemon.ready" not in names
    assert _events(service)[-1]["reason"] == "test"
    assert service.failure is None


def test_a_failed_start_is_a_coded_error_stop(env: Env) -> None:
    """A component that cannot start: not raised; `failure` and daemon.stopped say why."""
    service = Service(
        env.settings(isolation_mode="none"), components=[_refusing], stream=io.StringIO()
    )
    anyio.run(service.run)
    assert service.failure is not None and service.failure.code == "listen_failed"
    last = _events(service)[-1]
    assert (last["event"], last["reason"], last["error_code"], last["level"]) == (
        "daemon.stopped",
        "start_failed",
        "listen_failed",
        "error",
    )
    assert to_ecs(last)["event"]["outcome"] == "failure"
    assert "daemon.ready" not in _names(service)


def test_a_bug_at_start_is_recorded_then_raised(env: Env) -> None:
    """An unexpected exception is on the record (internal_error) and still raised."""
    service = Service(
        env.settings(isolation_mode="none"), components=[_broken], stream=io.StringIO()
    )
    with pytest.raises(BaseExceptionGroup) as caught:
        anyio.run(service.run)
    assert caught.group_contains(RuntimeError, match="a bug", depth=None)
    last = _events(service)[-1]
    assert (last["event"], last["error_code"]) == ("daemon.stopped", "internal_error")


async def test_a_sighup_during_startup_is_replayed_once_ready(env: Env) -> None:
    """A SIGHUP while the daemon starts is not lost and kills nothing: one reload after
    ready (`reason: signal_during_startup`); a stop then ends it normally."""
    service = Service(
        env.settings(isolation_mode="none"), components=[_hup_on_start], stream=io.StringIO()
    )
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        with anyio.fail_after(5):
            while "daemon.reloading" not in _flushed(service):
                await anyio.sleep(0.02)
        service.request_stop("test")
    events = _events(service)
    names = [e["event"] for e in events]
    reload = names.index("daemon.reloading")
    assert names.index("daemon.ready") < reload
    assert events[reload]["reason"] == "signal_during_startup"
    assert names.count("daemon.reloading") == 1
    assert names[-1] == "daemon.stopped"


def _flushed(service: Service) -> list[str]:
    service.events.flush()
    return _names(service)


async def test_sighups_during_a_reload_make_one_more(env: Env) -> None:
    """Reloads run one at a time; the SIGHUPs that arrive during one make exactly one more,
    and a SIGHUP while the daemon stops is ignored."""
    release = anyio.Event()
    entered = anyio.Event()

    @asynccontextmanager
    async def slow_hook(
        service: Service, manager: PluginManager
    ) -> AsyncIterator[HangupHook | None]:
        async def hook() -> None:
            entered.set()
            await release.wait()

        yield hook

    service = Service(
        env.settings(isolation_mode="none"), components=[slow_hook], stream=io.StringIO()
    )
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        os.kill(os.getpid(), signal.SIGHUP)
        with anyio.fail_after(5):
            await entered.wait()
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGHUP)
            await anyio.sleep(0.05)
        release.set()
        with anyio.fail_after(5):
            while _flushed(service).count("daemon.reloading") < 2:
                await anyio.sleep(0.02)
        await anyio.sleep(0.2)
        service.request_stop("test")
        os.kill(os.getpid(), signal.SIGHUP)
    assert _names(service).count("daemon.reloading") == 2


async def test_a_run_over_http_is_answered_when_the_shutdown_cuts_it(
    env: Env, plugins: PluginFactory, tmp_path: Path
) -> None:
    """Through the real API component: a hung run in flight at stop is answered 503
    daemon_stopping (the API waits for the drain before it closes the connection)."""
    plugins.write("hung", code=HUNG_ASYNC_RUN)
    tokens = write_tokens(tmp_path / "tokens.toml", {"ops": ("plugins:execute",)})
    sock_path = tmp_path / "api.sock"
    settings = env.settings(
        isolation_mode="none",
        api_listen=f"unix:{sock_path}",
        tokens_file=tmp_path / "tokens.toml",
        shutdown_grace_s=2.0,
        run_timeout_s=60,
    )
    service = Service(settings, components=[api_component], stream=io.StringIO())
    answer: dict[str, Any] = {}

    def call() -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(20)
            sock.connect(str(sock_path))
            sock.sendall(
                b"POST /api/v1/plugins/test.hung/run HTTP/1.1\r\nHost: localhost\r\n"
                + f"Authorization: Bearer {tokens['ops']}\r\n".encode()
                + b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        answer.update(status=int(head.split()[1]), body=json.loads(body))

    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        assert service.manager is not None
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        with anyio.fail_after(10):
            while service.manager.inflight == 0:
                await anyio.sleep(0.01)
        service.request_stop("test")
    await anyio.to_thread.run_sync(caller.join, 10)
    assert answer["status"] == 503
    assert answer["body"]["error"]["code"] == "daemon_stopping"
    assert _events(service)[-1]["event"] == "daemon.stopped"


@pytest.mark.parametrize(
    ("exc", "code", "expected"),
    [
        (ConfigError("taken", code="listen_failed"), "listen_failed", True),
        (FileNotFoundError(2, "No such file or directory", "/x"), "os_error", True),
        (RuntimeError("bug"), "internal_error", False),
        (ExceptionGroup("g", [RuntimeError("bug"), ConfigError("t")]), "config_invalid", True),
        (ExceptionGroup("g", [ExceptionGroup("h", [KeyError("k")])]), "internal_error", False),
    ],
)
def test_what_ends_the_daemon_is_found_and_coded(
    exc: BaseException, code: str, expected: bool
) -> None:
    """Coded errors and OS errors are expected failures (found in groups too); anything else
    is an internal error."""
    error, was_expected = _failure(exc)
    assert (error.code, was_expected) == (code, expected)
    if code == "os_error":
        assert error.message == "/x: No such file or directory"
