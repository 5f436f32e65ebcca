"""The shipped systemd files: `systemd-analyze verify` clean, exposure <= 1.5, sane contents."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from aisoc_plugind.config.settings import Settings
from tests.conftest import REPO

SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "aisoc-plugind.service"
INSTALLED = "/opt/aisoc-plugind/venv/bin/aisoc-plugind"  # docs/service.md, step 1
SYSUSERS = SYSTEMD / "aisoc-plugind.sysusers.conf"
TMPFILES = SYSTEMD / "aisoc-plugind.tmpfiles.conf"
MAX_EXPOSURE = 1.5
EXPOSURE_RE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+)")

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package `systemd`; .ci/run installs it)",
)
needs_root_tools = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None
    or shutil.which("systemd-tmpfiles") is None
    or os.geteuid() != 0,
    reason="needs systemd-sysusers and systemd-tmpfiles, run as root (they chown in --root)",
)


def directives(text: str) -> list[tuple[str, str]]:
    """Return `(key, value)` for every directive line of a unit file, in order."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.append((key.strip(), value.strip()))
    return out


def values(key: str) -> list[str]:
    return [v for k, v in directives(UNIT.read_text()) if k == key]


@pytest.fixture
def testable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart names an executable that exists here.

    `verify` checks that the command is executable; the real path is only there once the
    package is installed. Everything else in the copy is byte-for-byte the shipped unit.
    """
    fake = tmp_path / "bin" / "aisoc-plugind"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED} ") == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={fake} "))
    return unit


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.systemd
@needs_analyze
def test_unit_passes_systemd_analyze_verify(testable_unit: Path) -> None:
    """`systemd-analyze verify` finds nothing to say about the unit."""
    done = analyze("verify", "--man=no", "--generators=no", str(testable_unit))
    about_us = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if testable_unit.name in line or str(testable_unit.parent) in line
    ]
    assert done.returncode == 0, done.stderr
    assert about_us == []


@pytest.mark.systemd
@needs_analyze
def test_unit_exposure_is_at_most_one_and_a_half(testable_unit: Path) -> None:
    """`systemd-analyze security --offline` rates the unit's exposure <= 1.5 ("OK")."""
    done = analyze(
        "security",
        "--offline=true",
        f"--threshold={int(MAX_EXPOSURE * 10)}",
        "--no-pager",
        str(testable_unit),
    )
    match = EXPOSURE_RE.search(done.stdout + done.stderr)
    assert match is not None, done.stdout + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr


def test_unit_is_type_notify_with_watchdog_and_reload_by_sighup() -> None:
    """Readiness and liveness come from the daemon; `systemctl reload` sends SIGHUP."""
    assert values("Type") == ["notify"]
    assert values("NotifyAccess") == ["main"]
    assert values("WatchdogSec") == ["30"]
    assert values("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert values("Restart") == ["on-failure"]
    assert values("ExecStart") == [f"{INSTALLED} run --config /etc/aisoc-plugind/config.toml"]


def test_exec_start_and_documentation_are_what_the_documented_install_creates() -> None:
    """docs/service.md's install steps create the venv ExecStart runs and the doc file."""
    guide = (REPO / "docs" / "service.md").read_text()
    assert "python3 -m venv /opt/aisoc-plugind/venv" in guide
    assert INSTALLED == "/opt/aisoc-plugind/venv/bin/aisoc-plugind"
    (doc_url,) = values("Documentation")
    assert doc_url.startswith("file://")
    installed_doc = doc_url.removeprefix("file://")
    assert f"docs/service.md {installed_doc}" in guide
    assert (REPO / "docs" / Path(installed_doc).name).exists()


def test_stop_timeout_leaves_room_for_the_drain() -> None:
    """systemd waits longer than the daemon's own drain deadline before it kills."""
    assert float(values("TimeoutStopSec")[0]) > Settings().shutdown_grace_s


def test_plugins_keys_and_config_are_not_writable_by_the_service() -> None:
    """Code, trust anchors and config are read-only: a write bug must not become code exec."""
    settings = Settings()
    writable = " ".join(values("ReadWritePaths")).split()
    read_only = [p.lstrip("-") for p in " ".join(values("ReadOnlyPaths")).split()]
    assert values("ProtectSystem") == ["strict"]
    for path in (settings.plugins_dir, settings.keys_dir, settings.tokens_file.parent):
        assert str(path) in read_only
        assert not any(str(path).startswith(w.lstrip("-")) for w in writable)
    assert values("User") == values("Group") == ["aisoc-plugind"]
    assert values("CapabilityBoundingSet") == [""]


def test_service_directories_match_the_default_paths() -> None:
    """The audit file's directory is the LogsDirectory systemd creates for the service user."""
    assert Settings().audit_path.parent == Path("/var/log") / values("LogsDirectory")[0]
    assert values("StateDirectory") == values("RuntimeDirectory") == ["aisoc-plugind"]


@pytest.mark.systemd
@needs_root_tools
def test_sysusers_and_tmpfiles_create_user_and_directories(tmp_path: Path) -> None:
    """Applied to an empty root: the user exists, plugins/keys are root-owned 0755."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / name).touch()
    subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(SYSUSERS)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    entry = next(
        line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
        if line.startswith("aisoc-plugind:")
    )
    uid, gid = int(entry[2]), int(entry[3])
    subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create", str(TMPFILES)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    expected = {
        "etc/aisoc-plugind": (0o750, 0, gid),
        "opt/aisoc/plugins": (0o755, 0, 0),
        "opt/aisoc/plugin-keys": (0o755, 0, 0),
        "var/log/aisoc-plugind": (0o750, uid, gid),
        "var/lib/aisoc-plugind": (0o750, uid, gid),
    }
    for rel, (mode, owner, group) in expected.items():
        st = (root / rel).stat()
        assert (rel, st.st_mode & 0o7777, st.st_uid, st.st_gid) == (rel, mode, owner, group)
