"""Keep the revocation list (`trust.revoked_file`) in force: at start, on SIGHUP, on change.

The file's directory is watched with inotify (`api.filewatch.ChangeFlag`): a change is read
and applied at once, well within a second. Whatever inotify says, the file's identity is
looked at every `RECHECK_S` (every `POLL_S` while no watch is possible, e.g. while the
directory does not exist), so that no setup misses a change for long.

A file that cannot be used (unreadable, unsafe mode, not TOML, wrong keys or types) fails
closed: the last good list stays in force and `trust.revocations.failed` says why, with a
`revoked_file_*` code, once per version of the file. It never stops the daemon.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from aisoc_plugind.api.filewatch import ChangeFlag
from aisoc_plugind.audit import names
from aisoc_plugind.core.revocation import RevocationList
from aisoc_plugind.engine.results import SYSTEM, Caller
from aisoc_plugind.engine.revoked_file import FileIdentity, file_identity, read_revocations
from aisoc_plugind.errors import RevocationFileError

if TYPE_CHECKING:
    from aisoc_plugind.engine.manager import PluginManager

__all__ = ["POLL_S", "RECHECK_S", "SETTLE_S", "RevocationWatch"]

RECHECK_S = 1.0  # the file's identity is looked at least this often while inotify watches
POLL_S = 0.25  # ... and this often while it cannot
# After inotify speaks, wait this long for the writer to finish (an in-place edit is a
# truncation, then writes): a half-written file is not read as the operator's new list.
SETTLE_S = 0.05


class RevocationWatch:
    """Read the revocation file when it changes and hand the list to the manager."""

    def __init__(self, manager: PluginManager) -> None:
        self.manager = manager
        self.path = manager.settings.revoked_file
        self._wake = anyio.Event()
        self.flag = ChangeFlag(self.path, on_change=self._poke)
        self._seen: FileIdentity | None = None
        self._read_once = False
        self._failed: tuple[FileIdentity | None, str] | None = None

    def _poke(self) -> None:
        self._wake.set()

    async def load(
        self, *, force: bool = False, reread: bool = False, caller: Caller = SYSTEM
    ) -> None:
        """Read the file if it changed (`reread`: whatever its identity says) and apply it.

        `force` (start, SIGHUP) reads it in any case and re-applies the list even when it did
        not change, so that plugins loaded meanwhile are checked against it.
        """
        identity = await anyio.to_thread.run_sync(file_identity, self.path)
        if not (force or reread) and self._read_once and identity == self._seen:
            return
        self._seen, self._read_once = identity, True
        try:
            revoked = await anyio.to_thread.run_sync(read_revocations, self.path)
        except RevocationFileError as exc:
            self._refused(identity, exc, force=force)
            return
        self._failed = None
        if revoked == self.manager.revoked and not force:
            return
        await self._adopt(revoked, caller)

    async def _adopt(self, revoked: RevocationList, caller: Caller) -> None:
        before = self.manager.revoked
        outcome = await self.manager.adopt_revocations(revoked, caller)
        if revoked != before or outcome.revoked or outcome.restored:
            self.manager.events.emit(
                names.REVOCATIONS_CHANGED,
                path=str(self.path),
                keys=sorted(revoked.keys),
                digests=sorted(revoked.digests),
                plugins_revoked=outcome.revoked,
                plugins_restored=outcome.restored,
                **caller.fields(),
            )

    def _refused(
        self, identity: FileIdentity | None, exc: RevocationFileError, *, force: bool
    ) -> None:
        """Report a file that cannot be used, once per version of it; keep the last list."""
        if not force and self._failed == (identity, exc.code):
            return
        self._failed = (identity, exc.code)
        self.manager.events.emit(
            names.REVOCATIONS_FAILED,
            level="error",
            path=str(self.path),
            error_code=exc.code,
            error=exc.message,
            keys=sorted(self.manager.revoked.keys),  # the list that stays in force
            digests=sorted(self.manager.revoked.digests),
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch the file until cancelled; apply each change as it comes."""
        loop = asyncio.get_running_loop()
        try:
            self.flag.attach(loop)
            task_status.started()
            while True:
                try:
                    await self._next(loop)
                except Exception as exc:  # a bug must not end the watch, nor the daemon
                    self._report_bug(exc)
        finally:
            self.flag.close()

    def _report_bug(self, exc: Exception) -> None:
        self.manager.events.emit(
            names.REVOCATIONS_FAILED,
            level="error",
            path=str(self.path),
            error_code="revocation_internal_error",
            error=f"{type(exc).__name__}: {exc}",
            keys=sorted(self.manager.revoked.keys),
            digests=sorted(self.manager.revoked.digests),
        )

    async def _next(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.flag.watching:
            self.flag.attach(loop)  # the directory may exist now
        with anyio.move_on_after(RECHECK_S if self.flag.watching else POLL_S):
            await self._wake.wait()
        poked = self._wake.is_set()
        if poked:
            await anyio.sleep(SETTLE_S)
        self._wake = anyio.Event()
        self.flag.changed()  # consume the flag: the file is looked at now
        await self.load(reread=poked)
