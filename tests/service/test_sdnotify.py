"""sd_notify: datagrams on a real AF_UNIX socket set as NOTIFY_SOCKET, checked in order."""

from __future__ import annotations

import io
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest

from aisoc_plugind.core.records import PluginRecord, State
from aisoc_plugind.service.daemon import Service
from aisoc_plugind.service.sdnotify import (
    Notifier,
    monotonic_usec,
    sdnotify_component,
    socket_address,
    status_line,
    watchdog_interval,
)
from tests.conftest import Env, PluginFactory

WAIT_S = 5


class Listener:
    """The service manager's end: a bound datagram socket, read without blocking the loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[str] = []

    async def next(self) -> str:
        with anyio.fail_after(WAIT_S):
            await anyio.wait_readable(self.sock)
        message = self.sock.recv(4096).decode()
        self.received.append(message)
        return message

    async def next_skipping_watchdog(self) -> str:
        while (message := await self.next()) == "WATCHDOG=1":
            pass
        return message


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """A filesystem notify socket in tmp_path, exported as NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        yield Listener(sock)


@pytest.fixture
def abstract_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """An abstract-namespace notify socket, exported as NOTIFY_SOCKET=@name."""
    name = f"aisoc-plugind-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield Listener(sock)


# ---- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@abstract-name", "\0abstract-name"),
        (None, None),
        ("", None),
        ("@", None),
        ("relative/path", None),
        ("vsock:2:1234", None),
    ],
)
def test_socket_address_maps_notify_socket_values(value: str | None, expected: str | None) -> None:
    """Absolute paths are sockets, `@name` is abstract, anything else disables notify."""
    assert socket_address(value) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "SELF"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ],
)
def test_watchdog_interval_reads_usec_for_this_process_only(
    env: dict[str, str], expected: float | None
) -> None:
    """The timeout comes from WATCHDOG_USEC, and only if WATCHDOG_PID (when set) is us."""
    env = {k: (str(os.getpid()) if v == "SELF" else v) for k, v in env.items()}
    assert watchdog_interval(env) == expected


def _record(state: State) -> PluginRecord:
    return PluginRecord(
        id=f"p.{state.value}",
        name="P",
        version="1",
        plugin_type="enricher",
        state=state,
        signature_status=None,
        signing_key_id=None,
        error=None,
        path="/x",
        loaded_at=None,
        manifest={},
    )


def test_status_line_counts_plugins_and_shouts_about_the_audit_log() -> None:
    """STATUS= says what serves and what failed; a failing audit file is impossible to miss."""
    records = [_record(State.ENABLED), _record(State.ENABLED), _record(State.FAILED)]
    assert status_line(records) == "serving 2 plugins (0 disabled, 1 failed)"
    assert status_line([], "/var/log/x: ENOSPC").endswith("AUDIT LOG FAILING: /var/log/x: ENOSPC")


# ---- the notifier on a real socket -----------------------------------------------------------


def test_notify_without_notify_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd every call returns False and nothing is opened."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environ()
    assert not notifier.enabled
    assert (notifier.ready("x"), notifier.watchdog(), notifier.stopping()) == (False,) * 3


async def test_notifier_sends_each_message_in_order(listener: Listener) -> None:
    """ready, status, reloading, ready, watchdog, stopping arrive as sent, one datagram each."""
    notifier = Notifier.from_environ()
    before = monotonic_usec()
    assert notifier.ready("up")
    assert notifier.status("busy\nreloading")  # a newline would start a new field
    assert notifier.reloading()
    assert notifier.ready()
    assert notifier.watchdog()
    assert notifier.stopping()
    messages = [await listener.next() for _ in range(6)]
    assert messages[:2] == ["READY=1\nSTATUS=up", "STATUS=busy reloading"]
    reloading, stamp = messages[2].split("\n")
    assert reloading == "RELOADING=1"
    key, value = stamp.split("=")
    assert (key, int(value) >= before) == ("MONOTONIC_USEC", True)
    assert messages[3:] == ["READY=1", "WATCHDOG=1", "STOPPING=1"]


async def test_abstract_notify_socket_is_reached(abstract_listener: Listener) -> None:
    """`NOTIFY_SOCKET=@name` reaches the abstract socket `\\0name`."""
    assert Notifier.from_environ().ready("abstract")
    assert await abstract_listener.next() == "READY=1\nSTATUS=abstract"


def test_notify_to_a_vanished_socket_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send that fails is reported as False, never raised."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert Notifier.from_environ().ready() is False


# ---- the component ---------------------------------------------------------------------------


def _fakes() -> tuple[SimpleNamespace, SimpleNamespace]:
    service = SimpleNamespace(ready=anyio.Event(), events=SimpleNamespace(failure=None))
    manager = SimpleNamespace(records=lambda: [_record(State.ENABLED)])
    return service, manager


async def test_component_sends_ready_watchdog_reload_and_stopping_in_order(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY once ready, WATCHDOG=1 pings from the loop, READY after SIGHUP, STOPPING at exit."""
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # pings every 20 ms
    service, manager = _fakes()
    async with sdnotify_component(service, manager) as hook:  # type: ignore[arg-type]
        assert await listener.next() == "WATCHDOG=1"  # watchdog runs before ready, too
        service.ready.set()
        assert await listener.next_skipping_watchdog() == (
            "READY=1\nSTATUS=serving 1 plugins (0 disabled, 0 failed)"
        )
        assert await listener.next() == "WATCHDOG=1"
        assert hook is not None
        await hook()
        assert (await listener.next_skipping_watchdog()).startswith("READY=1\nSTATUS=serving")
    assert await listener.next_skipping_watchdog() == "STOPPING=1\nSTATUS=stopping"


async def test_component_outside_systemd_yields_no_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET the component does nothing and registers no SIGHUP hook."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "40000")
    service, manager = _fakes()
    async with sdnotify_component(service, manager) as hook:  # type: ignore[arg-type]
        assert hook is None


async def test_service_reports_ready_reload_and_stopping(
    env: Env, plugins: PluginFactory, listener: Listener
) -> None:
    """A real Service: READY after discovery, RELOADING then READY around hangup, STOPPING."""
    plugins.write("a")
    service = Service(env.settings(), components=[sdnotify_component], stream=io.StringIO())
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        assert await listener.next() == "READY=1\nSTATUS=serving 1 plugins (0 disabled, 0 failed)"
        await service.hangup()
        assert (await listener.next()).startswith("RELOADING=1\nMONOTONIC_USEC=")
        message = await listener.next()
        assert message == "READY=1\nSTATUS=serving 1 plugins (0 disabled, 0 failed)"
        service.request_stop("test")
    assert await listener.next() == "STOPPING=1\nSTATUS=stopping"
