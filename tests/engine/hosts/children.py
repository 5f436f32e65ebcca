"""Start sandboxed child processes for the host tests and read what they send back."""

from __future__ import annotations

import marshal
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("child.py")
# What the supervisor's own environment may hold and a host must never see.
LEAKY_ENV = {
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "AISOC_PLUGIND_TOKEN": "t0ken-of-the-daemon",
    "AISOC_PLUGIND__API__LISTEN": "127.0.0.1:8470",
    "CREDENTIALS_DIRECTORY": "/run/credentials/aisoc-plugind.service",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """One plugin's view of a daemon's files, built in a temp dir outside every allowed path."""

    root: Path
    plugin_dir: Path
    other_plugin_dir: Path
    state_dir: Path
    other_state_dir: Path
    private_tmp: Path
    tokens_file: Path
    audit_file: Path
    shadow_file: Path

    @classmethod
    def create(cls, root: Path) -> Layout:
        """Create the directories and files, all readable and writable under plain DAC."""
        layout = cls(
            root=root,
            plugin_dir=root / "plugins" / "me",
            other_plugin_dir=root / "plugins" / "other",
            state_dir=root / "state" / "me",
            other_state_dir=root / "state" / "other",
            private_tmp=root / "host-tmp",
            tokens_file=root / "etc" / "tokens.json",
            audit_file=root / "log" / "audit.jsonl",
            shadow_file=root / "etc" / "shadow",
        )
        for d in (layout.plugin_dir, layout.other_plugin_dir, layout.other_state_dir):
            d.mkdir(parents=True)
            (d / "data.txt").write_text("data")
        for d in (layout.state_dir, layout.private_tmp):
            d.mkdir(parents=True)
        layout.tokens_file.parent.mkdir()
        layout.tokens_file.write_text('{"tokens": ["secret"]}')
        layout.shadow_file.write_text("root:$6$hash:19000::::::")
        layout.audit_file.parent.mkdir()
        layout.audit_file.write_text('{"event": "daemon.started"}\n')
        return layout

    def spec(self, **overrides: Any) -> dict[str, Any]:
        """The standard host sandbox for this plugin, as the child's `build` reads it."""
        base = {
            "plugin_dirs": [str(self.plugin_dir)],
            "write_paths": [str(self.state_dir), str(self.private_tmp)],
            "environment": {
                "PATH": "/usr/bin:/bin",
                "LANG": "C.UTF-8",
                "TMPDIR": str(self.private_tmp),
                "HOME": str(self.state_dir),
            },
        }
        return {**base, **overrides}


class Child:
    """A started child process and the read end of its result pipe."""

    def __init__(self, proc: subprocess.Popen[bytes], result_fd: int) -> None:
        self.proc = proc
        self.result_fd = result_fd

    def receive(self, timeout: float = 10.0) -> dict[str, Any]:
        """Read one frame; fail with the child's stderr when none comes."""
        header = self._read_exactly(4, timeout)
        return marshal.loads(self._read_exactly(int.from_bytes(header, "big"), timeout))  # type: ignore[no-any-return]

    def closed_within(self, timeout: float) -> bool:
        """Whether every writer of the result pipe is gone (EOF) within `timeout` seconds."""
        ready, _, _ = select.select([self.result_fd], [], [], timeout)
        return bool(ready) and os.read(self.result_fd, 1) == b""

    def _read_exactly(self, size: int, timeout: float) -> bytes:
        data = b""
        deadline = time.monotonic() + timeout
        while len(data) < size:
            ready, _, _ = select.select([self.result_fd], [], [], deadline - time.monotonic())
            chunk = os.read(self.result_fd, size - len(data)) if ready else b""
            if not chunk:
                raise AssertionError(f"child sent nothing: {self._stderr()}")
            data += chunk
        return data

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=5)
        return err.decode(errors="replace")


@contextmanager
def started(
    job: Mapping[str, Any],
    *,
    pass_fds: tuple[int, ...] = (),
    env: Mapping[str, str] | None = None,
    argv: list[str] | None = None,
) -> Iterator[Child]:
    """Start `child.py` on `job` (or `argv` with the job appended); kill and reap it at exit."""
    read_fd, write_fd = os.pipe()
    payload = marshal.dumps({**job, "result_fd": write_fd}).hex()
    try:
        proc = subprocess.Popen(
            [*(argv or [sys.executable, str(CHILD)]), payload],
            pass_fds=(write_fd, *pass_fds),
            env={**os.environ, **LEAKY_ENV, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(write_fd)
    try:
        yield Child(proc, read_fd)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        os.close(read_fd)


def run_child(job: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Run `child.py` on `job` to the end; return its one message."""
    with started(job, **kwargs) as child:
        message = child.receive()
        child.proc.wait(timeout=10)
    return message
