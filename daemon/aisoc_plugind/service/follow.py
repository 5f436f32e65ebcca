"""Follow OCI tags (`oci.follow`): poll each tag, install a new digest with replace.

Each entry is polled every `interval_s`: the tag is resolved to a manifest digest (one
manifest request); a digest other than the one in use is installed pinned
(`HOST/REPO@sha256:...`) with `replace`, through the normal install path (trust mode,
staging, reload, `.previous/`). The digest in use per ref is kept in
`state_dir/.daemon/follow.json`, so a restarted daemon does not reinstall what it runs.

A registry that cannot be reached (or answers with an error) gives `plugin.follow.failed`
and the next poll waits twice as long each time, up to `BACKOFF_CAP_S`. A digest the daemon
refused (unsigned, invalid, not a plugin...) gives `plugin.follow.failed` once and is not
pulled again until the tag moves, the daemon restarts or a SIGHUP re-reads the keys (a key
added since may now verify it: every entry is polled again at once); the current version
serves on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from aisoc_plugind.audit import names
from aisoc_plugind.audit.log import EventLog
from aisoc_plugind.config.settings import OciFollow, Settings
from aisoc_plugind.delivery.oci import resolve_digest
from aisoc_plugind.delivery.reference import parse_reference, pinned
from aisoc_plugind.engine.results import Caller
from aisoc_plugind.errors import (
    ArchiveError,
    AuditUnavailable,
    OciError,
    PluginDError,
    PluginNotFound,
)
from aisoc_plugind.files import FileRefused, read_regular, replace_file

if TYPE_CHECKING:
    from aisoc_plugind.engine.manager import PluginManager
    from aisoc_plugind.service.daemon import HangupHook, Service

__all__ = [
    "BACKOFF_CAP_S",
    "FOLLOW",
    "FollowState",
    "Followed",
    "Follower",
    "backoff_delay",
    "follow_component",
    "state_path",
]

FOLLOW = Caller(actor="follow")
BACKOFF_CAP_S = 3600.0
_STATE_CAP = 1024 * 1024

Resolver = Callable[[str], str]


def backoff_delay(interval_s: float, failures: int) -> float:
    """Return the wait before the next poll after `failures` failures in a row.

    No failure: the interval. Then twice the interval, four times, ... never more than
    `BACKOFF_CAP_S` (or the interval itself, when that is longer).
    """
    if failures <= 0:
        return interval_s
    grown: float = interval_s * 2.0 ** min(failures, 30)
    return min(grown, max(interval_s, BACKOFF_CAP_S))


def state_path(settings: Settings) -> Path:
    """Return where the digests in use are kept (the daemon's part of `state_dir`)."""
    return settings.state_dir / ".daemon" / "follow.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class Followed:
    """The digest installed for a followed ref, and the plugin id it installed."""

    digest: str
    plugin_id: str


class FollowState:
    """The digest in use per followed ref, written atomically to one small JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries = _read_state(path)
        self._lock = anyio.Lock()

    def get(self, ref: str) -> Followed | None:
        """Return what is installed for `ref`, if anything was."""
        return self._entries.get(ref)

    async def put(self, ref: str, followed: Followed) -> None:
        """Remember `followed` for `ref` and write the file (tmp + fsync + rename)."""
        async with self._lock:
            self._entries[ref] = followed
            data = _dump_state(self._entries)
            await anyio.to_thread.run_sync(self._write, data)

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_file(self.path, data, mode=0o600, sync_dir=True)


def _read_state(path: Path) -> dict[str, Followed]:
    """Read the state file; a missing or unreadable one is empty (a reinstall is harmless)."""
    try:
        doc = json.loads(read_regular(path, cap=_STATE_CAP))
        refs = doc["refs"]
        return {
            str(ref): Followed(digest=str(v["digest"]), plugin_id=str(v["plugin_id"]))
            for ref, v in refs.items()
        }
    except (OSError, FileRefused, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _dump_state(entries: Mapping[str, Followed]) -> bytes:
    refs = {ref: {"digest": f.digest, "plugin_id": f.plugin_id} for ref, f in entries.items()}
    return json.dumps({"refs": refs}, sort_keys=True, indent=2).encode() + b"\n"


@dataclass(slots=True)
class _Track:
    """The polling state of one entry: failures in a row, and a digest that was refused."""

    entry: OciFollow
    failures: int = 0
    refused: str | None = None
    wake: anyio.Event = field(default_factory=anyio.Event)


class Follower:
    """Poll every `oci.follow` entry in its own task; see the module docstring."""

    def __init__(
        self,
        entries: tuple[OciFollow, ...],
        events: EventLog,
        manager: PluginManager,
        resolve: Resolver,
        state: FollowState,
    ) -> None:
        self.events = events
        self.manager = manager
        self._resolve = resolve
        self.state = state
        self.tracks = [_Track(entry) for entry in entries]

    async def run(self, ready: anyio.Event) -> None:
        """Once the daemon is ready (discovery done), follow every entry until cancelled."""
        await ready.wait()
        async with anyio.create_task_group() as tg:
            for track in self.tracks:
                tg.start_soon(self.follow, track)

    def keys_reloaded(self) -> None:
        """Forget refused digests and poll every entry now: the keys changed (SIGHUP), so a
        digest refused for its signature may verify now (a failing one fails again, once)."""
        for track in self.tracks:
            track.refused = None
            track.wake.set()

    async def follow(self, track: _Track) -> None:
        """Poll one entry forever; a bug is reported as `plugin.follow.failed`, never fatal."""
        while True:
            try:
                delay = await self.poll(track)
            except Exception as exc:  # a bug must not end following; it is reported
                delay = self._failed(track, "follow_internal_error", type(exc).__name__)
            with anyio.move_on_after(delay):
                await track.wake.wait()
            track.wake = anyio.Event()

    async def poll(self, track: _Track) -> float:
        """Resolve the tag once; install a new digest. Return the wait before the next poll."""
        ref = track.entry.ref
        try:
            digest = await anyio.to_thread.run_sync(self._resolve, ref)
        except PluginDError as exc:
            return self._failed(track, exc.code, exc.message)
        if digest == track.refused or self._in_use(ref, digest):
            track.failures = 0
            return track.entry.interval_s
        return await self._update(track, digest)

    def _in_use(self, ref: str, digest: str) -> bool:
        known = self.state.get(ref)
        if known is None or known.digest != digest:
            return False
        try:
            self.manager.get(known.plugin_id)
        except PluginNotFound:
            return False  # installed once, then unloaded and forgotten: install again
        return True

    async def _update(self, track: _Track, digest: str) -> float:
        ref = track.entry.ref
        target = str(pinned(parse_reference(ref), digest))
        try:
            result = await self.manager.install_from_oci(target, FOLLOW, replace=True)
        except PluginDError as exc:
            if _transient(exc):
                return self._failed(track, exc.code, exc.message, digest=digest)
            track.refused, track.failures = digest, 0
            self._emit_failed(ref, exc.code, exc.message, digest=digest)
            return track.entry.interval_s
        version = self.manager.get(result.plugin_id).version
        await self.state.put(ref, Followed(digest=digest, plugin_id=result.plugin_id))
        track.failures, track.refused = 0, None
        self.events.emit(
            names.PLUGIN_FOLLOW_UPDATED,
            ref=ref,
            digest=digest,
            plugin_id=result.plugin_id,
            version=version,
            **FOLLOW.fields(),
        )
        return track.entry.interval_s

    def _failed(self, track: _Track, code: str, message: str, **fields: Any) -> float:
        track.failures += 1
        delay = backoff_delay(track.entry.interval_s, track.failures)
        self._emit_failed(
            track.entry.ref, code, message, attempt=track.failures, delay_s=delay, **fields
        )
        return delay

    def _emit_failed(self, ref: str, code: str, message: str, **fields: Any) -> None:
        self.events.emit(
            names.PLUGIN_FOLLOW_FAILED,
            level="error",
            ref=ref,
            error_code=code,
            error=message,
            **fields,
            **FOLLOW.fields(),
        )


def _transient(exc: PluginDError) -> bool:
    """Return True for failures worth retrying the same digest (registry, audit file)."""
    if isinstance(exc, AuditUnavailable):
        return True
    return isinstance(exc, OciError) and not isinstance(exc, ArchiveError)


def follow_component(
    service: Service, manager: PluginManager
) -> AbstractAsyncContextManager[HangupHook | None]:
    """Service component: follow the `oci.follow` tags (nothing when there are none)."""
    return _following(service, manager)


@asynccontextmanager
async def _following(service: Service, manager: PluginManager) -> AsyncIterator[HangupHook | None]:
    settings = service.settings
    if not settings.oci_follow:
        yield None
        return
    follower = Follower(
        settings.oci_follow,
        service.events,
        manager,
        _resolver(settings),
        FollowState(state_path(settings)),
    )

    async def hangup() -> None:
        follower.keys_reloaded()

    async with anyio.create_task_group() as tg:
        tg.start_soon(follower.run, service.ready)
        try:
            yield hangup
        finally:
            tg.cancel_scope.cancel()


def _resolver(settings: Settings) -> Resolver:
    def resolve(ref: str) -> str:
        return resolve_digest(
            ref,
            insecure_registries=settings.oci_allow_insecure_registries,
            ca_file=settings.oci_ca_file,
            docker_config=settings.oci_docker_config,
            allowed_registries=settings.oci_allowed_registries,
        )

    return resolve
