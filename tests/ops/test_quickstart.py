"""The README's first command, `scripts/quickstart.sh`, run for real.

It must serve a copy of the examples (never the tracked files), print the daemon's PID and
how to reload keys, and refuse to start, before writing anything, when its port is taken.
The state directory is redirected with `AISOC_QUICKSTART_DIR` so the repository's own
`.quickstart/` is left alone.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.live import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "quickstart.sh"

pytestmark = pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "aisoc-plugind").exists(),
    reason="the quickstart runs the project's .venv, which the test command creates",
)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _env(state: Path, listen: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AISOC", "PLUGIN_"))}
    env.update(AISOC_QUICKSTART_DIR=str(state), AISOC_PLUGIND_LISTEN=listen)
    return env


def _get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_refuses_a_taken_port_before_writing_anything(tmp_path: Path) -> None:
    state = tmp_path / "qs"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        done = subprocess.run(
            ["bash", str(SCRIPT)],
            env=_env(state, listen),
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    assert done.returncode == 1, done.stderr
    assert "is not free" in done.stderr
    assert not state.exists()  # no tokens file, no audit file, no copy


def test_serves_a_copy_prints_pid_and_leaves_examples_untouched(tmp_path: Path) -> None:
    state = tmp_path / "qs"
    port = free_port()
    before = _tree_digest(ROOT / "examples")
    out = tmp_path / "out.txt"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT)],
            env=_env(state, f"127.0.0.1:{port}"),
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if _get(port, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, out.read_text()
            time.sleep(0.2)
        else:
            pytest.fail(f"quickstart never became ready:\n{out.read_text()}")
        text = out.read_text()
        assert f"daemon PID {proc.pid}" in text  # exec keeps the shell's PID
        assert f"kill -HUP {proc.pid}" in text
        token = next(
            line.split("=", 1)[1]
            for line in text.splitlines()
            if line.strip().startswith("export AISOC_TOKEN=")
        )
        status, body = _get(port, "/api/v1/plugins", token)
        assert status == 200
        records = json.loads(body)["plugins"]
        assert {r["id"] for r in records} >= {"shodan-enricher", "wazuh-connector"}
        assert all(r["path"].startswith(str(state / "plugins")) for r in records)
        assert all(r["state"] == "enabled" for r in records)
        # the runbook's unsigned edit, done on the copy: the copy changes, the examples not
        target = state / "plugins" / "shodan-enricher" / "plugin.py"
        target.write_text(target.read_text() + "\n# edited\n")
        assert _tree_digest(ROOT / "examples") == before
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert _tree_digest(ROOT / "examples") == before
