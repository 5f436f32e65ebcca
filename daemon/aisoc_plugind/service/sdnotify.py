"""Tell systemd the daemon's state over `$NOTIFY_SOCKET` (sd_notify(3)), without libsystemd."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from aisoc_plugind.core.records import PluginRecord
    from aisoc_plugind.engine.manager import PluginManager
    from aisoc_plugind.service.daemon import HangupHook, Service

__all__ = [
    "Notifier",
    "monotonic_usec",
    "sdnotify_component",
    "socket_address",
    "status_line",
    "watchdog_interval",
]


def socket_address(value: str | None) -> str | None:
    """Return the AF_UNIX address named by `$NOTIFY_SOCKET`, or None when unusable.

    An absolute path is a filesystem socket; a leading `@` names an abstract socket (a
    leading NUL byte). Anything else (unset, empty, `vsock:` addresses) disables notify.
    """
    if not value or len(value) < 2:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@"):
        return "\0" + value[1:]
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Return the watchdog timeout in seconds from `$WATCHDOG_USEC`, or None when off.

    `$WATCHDOG_PID`, when set, must name this process: the watchdog is meant for the main
    process, not for children that inherited the environment.
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


def monotonic_usec() -> int:
    """Return CLOCK_MONOTONIC in microseconds (what `MONOTONIC_USEC=` carries)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def status_line(records: Iterable[PluginRecord], audit_failure: str | None = None) -> str:
    """Return the one-line `STATUS=` text: plugin counts by state, and audit trouble."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record.state.value] = counts.get(record.state.value, 0) + 1
    text = (
        f"serving {counts.get('enabled', 0)} plugins "
        f"({counts.get('disabled', 0)} disabled, {counts.get('failed', 0)} failed)"
    )
    if audit_failure:
        text += f"; AUDIT LOG FAILING: {audit_failure}"
    return text


class Notifier:
    """Send sd_notify datagrams; every method is a no-op returning False outside systemd."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build a notifier for `$NOTIFY_SOCKET`; nothing is opened until a message is sent."""
        env = os.environ if environ is None else environ
        return cls(socket_address(env.get("NOTIFY_SOCKET")))

    @property
    def enabled(self) -> bool:
        """Return True when running under a service manager that listens."""
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` fields as one datagram; return True when it was sent.

        A socket per message, like libsystemd: nothing stays open, nothing to close. Never
        blocks (non-blocking send) and never raises: a lost notification must not take the
        daemon down; systemd's own timeouts cover a missing one.
        """
        if self.address is None or not fields:
            return False
        message = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                return sock.sendto(message, self.address) == len(message)
        except OSError:
            return False

    def ready(self, status: str | None = None) -> bool:
        """Say startup (or a reload) is complete: `READY=1`, plus `STATUS=` when given."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """Say a reload started; `MONOTONIC_USEC` lets `Type=notify-reload` match it."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self, status: str | None = None) -> bool:
        """Say shutdown started: `STOPPING=1`, plus `STATUS=` when given."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """Ping the watchdog: `WATCHDOG=1`."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Update the free-form status line shown by `systemctl status`."""
        return self.notify(f"STATUS={text}")


async def _announce_ready(service: Service, manager: PluginManager, notifier: Notifier) -> None:
    await service.ready.wait()
    notifier.ready(status_line(manager.records(), service.events.failure))


async def _keep_alive(notifier: Notifier, period: float) -> None:
    # A ping from the event loop itself: a plugin that blocks the loop stops the pings and
    # systemd restarts the daemon after WatchdogSec (research §5, item 27).
    while True:
        notifier.watchdog()
        await anyio.sleep(period)


@asynccontextmanager
async def sdnotify_component(
    service: Service, manager: PluginManager
) -> AsyncIterator[HangupHook | None]:
    """Service component: READY=1 once ready, WATCHDOG=1 every interval/2, STOPPING=1 on exit.

    Yields a SIGHUP hook that sends READY=1 with a fresh STATUS= after the reload work; the
    matching RELOADING=1 must be sent before that work starts (`Notifier.reloading()`).
    """
    notifier = Notifier.from_environ()
    interval = watchdog_interval()

    async def reloaded() -> None:
        notifier.ready(status_line(manager.records(), service.events.failure))

    async with anyio.create_task_group() as tg:
        tg.start_soon(_announce_ready, service, manager, notifier)
        if interval is not None and notifier.enabled:
            tg.start_soon(_keep_alive, notifier, interval / 2)
        try:
            yield reloaded if notifier.enabled else None
        finally:
            notifier.stopping("stopping")
            tg.cancel_scope.cancel()
