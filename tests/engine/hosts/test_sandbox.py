"""The host sandbox, tested on real child processes that sandbox themselves and try things.

Every child is a fresh interpreter (`child.py`) that builds the standard host policy, calls
`sandbox.apply`, runs one probe and reports over a kept pipe. The tests run as root here: root
bypasses plain file permissions (every file here is readable and writable under DAC), but
not Landlock, so each refusal below is Landlock's (or an rlimit's) doing. The one fake is
the Landlock ABI probe handed to `apply` to simulate a kernel without Landlock (this one has
it); everything else is the real kernel.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.engine.hosts import sandbox
from aisoc_plugind.engine.hosts.landlock import Access
from aisoc_plugind.errors import SandboxError
from tests.engine.hosts.children import CHILD, LEAKY_ENV, Layout, run_child, started

PYTHON = [Path("/opt/python")]


@pytest.fixture(scope="module")
def tmp_outside() -> Iterator[Path]:
    """A name directly in /tmp (outside the private temp dir); removed if a test created it."""
    path = Path("/tmp") / f"aisoc-sandbox-{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def survey(layout: Layout, tmp_outside: Path, landlock_abi: int) -> dict[str, Any]:
    """One standard host's answers: file operations, environment, descriptors, limits."""
    spare_r, spare_w = os.pipe()
    ops = {
        "read_plugin_file": ("read", layout.plugin_dir / "data.txt"),
        "read_etc_hosts": ("read", "/etc/hosts"),
        "read_shadow": ("read", "/etc/shadow"),
        "read_shadow_copy": ("read", layout.shadow_file),
        "read_tokens": ("read", layout.tokens_file),
        "read_audit": ("read", layout.audit_file),
        "read_other_state": ("read", layout.other_state_dir / "data.txt"),
        "list_other_state": ("list", layout.other_state_dir),
        "read_other_plugin": ("read", layout.other_plugin_dir / "data.txt"),
        "read_passwd": ("read", "/etc/passwd"),
        "write_state": ("write", layout.state_dir / "new.txt"),
        "write_private_tmp": ("write", layout.private_tmp / "new.txt"),
        "write_plugin_dir": ("write", layout.plugin_dir / "new.txt"),
        "write_other_state": ("write", layout.other_state_dir / "new.txt"),
        "write_tmp": ("write", tmp_outside),
        "write_beside_private_tmp": ("write", layout.root / "new.txt"),
        "append_audit": ("append", layout.audit_file),
        "truncate_audit": ("truncate", layout.audit_file),
        "remove_audit": ("remove", layout.audit_file),
    }
    job = {
        "probe": "survey",
        "spec": layout.spec(),
        "ops": {name: (op, str(path)) for name, (op, path) in ops.items()},
        "env_names": sorted(LEAKY_ENV),
        "probe_fds": [spare_r, spare_w],
    }
    try:
        message = run_child(job, pass_fds=(spare_r, spare_w))
    finally:
        os.close(spare_r)
        os.close(spare_w)
    assert "result" in message, message
    return message


@pytest.mark.parametrize("name", ["read_plugin_file", "read_etc_hosts"])
def test_reads_allowed_paths(survey: dict[str, Any], name: str) -> None:
    """The plugin's own directory and the name-service files stay readable."""
    assert survey["result"]["ops"][name] == "ok"


@pytest.mark.parametrize(
    "name",
    [
        "read_shadow_copy",
        "read_tokens",
        "read_audit",
        "read_other_state",
        "list_other_state",
        "read_other_plugin",
        "read_passwd",
    ],
)
def test_cannot_read_outside_the_allowed_set(survey: dict[str, Any], name: str) -> None:
    """Tokens, audit, shadow-like, another plugin's files: PermissionError, even for root."""
    assert survey["result"]["ops"][name] == "PermissionError"


def test_cannot_read_etc_shadow(survey: dict[str, Any]) -> None:
    """The real /etc/shadow, which root could read under plain permissions, is refused."""
    if not Path("/etc/shadow").exists():
        pytest.skip("no /etc/shadow on this machine")
    assert survey["result"]["ops"]["read_shadow"] == "PermissionError"


@pytest.mark.parametrize("name", ["write_state", "write_private_tmp"])
def test_writes_to_the_write_paths(survey: dict[str, Any], name: str) -> None:
    """The plugin's state dir and the private temp dir take new files."""
    assert survey["result"]["ops"][name] == "ok"


@pytest.mark.parametrize(
    "name",
    [
        "write_plugin_dir",
        "write_other_state",
        "write_tmp",
        "write_beside_private_tmp",
        "append_audit",
        "truncate_audit",
        "remove_audit",
    ],
)
def test_cannot_write_outside_the_write_paths(survey: dict[str, Any], name: str) -> None:
    """The plugin dir, another plugin's state, /tmp and the audit file are not writable."""
    assert survey["result"]["ops"][name] == "PermissionError"


def test_audit_file_is_untouched(survey: dict[str, Any], layout: Layout) -> None:
    """The refused append, truncate and unlink left the audit file as it was."""
    assert layout.audit_file.read_text() == '{"event": "daemon.started"}\n'


def test_environment_is_exactly_the_given_one(survey: dict[str, Any], layout: Layout) -> None:
    """os.environ holds the spec's variables and nothing the supervisor had."""
    assert survey["result"]["environ"] == layout.spec()["environment"]


def test_c_environ_is_cleared_too(survey: dict[str, Any]) -> None:
    """getenv(3) no longer finds NOTIFY_SOCKET, AISOC_* or the credentials directory."""
    assert survey["result"]["c_getenv"] == dict.fromkeys(LEAKY_ENV)


def test_inherited_descriptors_are_closed(survey: dict[str, Any]) -> None:
    """A pipe the child inherited but was not told to keep is closed."""
    assert set(survey["result"]["fds"].values()) == {"OSError"}


def test_stdio_points_at_dev_null(survey: dict[str, Any]) -> None:
    """stdin and stdout, not kept, are /dev/null rather than closed and reusable."""
    assert survey["result"]["stdio_is_devnull"] == [True, True]


def test_core_dumps_are_off(survey: dict[str, Any]) -> None:
    """RLIMIT_CORE is 0 and the process is not dumpable."""
    assert survey["result"]["limits"]["RLIMIT_CORE"] == (0, 0)
    assert survey["result"]["dumpable"] == 0


def test_report_says_what_was_applied(survey: dict[str, Any], landlock_abi: int) -> None:
    """The report names the ABI, both scopes (ABI 6+), the limits and the kept descriptors."""
    report = survey["report"]
    assert report["landlock_status"] == "enforced"
    assert report["landlock_abi"] == landlock_abi
    if landlock_abi >= 6:
        assert report["scopes"] == ["abstract_unix_socket", "signal"]
    assert report["limits"]["address_space"] == 1024 * 1024 * 1024
    assert report["limits"]["core"] == 0
    assert 2 in report["kept_fds"]


@pytest.fixture(scope="module")
def runtime(layout: Layout, landlock_abi: int) -> dict[str, Any]:
    """A sandboxed child's attempts to import and use common stdlib modules."""
    job = {"probe": "runtime", "spec": layout.spec(), "private_tmp": str(layout.private_tmp)}
    message = run_child(job)
    assert "result" in message, message
    return message["result"]


def test_runtime_modules_were_not_preloaded(runtime: dict[str, Any]) -> None:
    """The modules below are imported after the sandbox, from the real installation."""
    assert runtime["preloaded"] == []


@pytest.mark.parametrize(
    "check",
    [
        "json",
        "hashlib",
        "ssl",
        "asyncio",
        "getaddrinfo",
        "decimal",
        "sqlite3",
        "zoneinfo",
        "mimetypes",
        "tempfile",
    ],
)
def test_runtime_works_in_the_sandbox(runtime: dict[str, Any], check: str) -> None:
    """Imports, TLS roots, name resolution, time zones, MIME types and the private temp dir."""
    if check == "sqlite3" and runtime[check] == "ModuleNotFoundError":
        pytest.skip("this interpreter was built without sqlite3")
    assert runtime[check] == "ok"


def test_address_space_limit_stops_a_big_allocation(layout: Layout) -> None:
    """With a 256 MiB budget, 512 MiB fails with MemoryError and 1 MiB still works."""
    job = {"probe": "allocate", "spec": layout.spec(memory_mb=256), "big": 512 * 1024 * 1024}
    result = run_child(job)["result"]
    assert result == {"big": "MemoryError", "small": "ok"}


def test_open_files_limit_stops_opening_more(layout: Layout) -> None:
    """With RLIMIT_NOFILE 32, opening files ends in EMFILE below 32 descriptors."""
    result = run_child({"probe": "open_many", "spec": layout.spec(max_open_files=32)})["result"]
    assert result["errno"] == errno.EMFILE
    assert result["opened"] < 32


def test_process_limit_is_set_when_given(layout: Layout) -> None:
    """RLIMIT_NPROC is set (soft = hard); the kernel does not enforce it for root."""
    job = {"probe": "ops", "spec": layout.spec(max_processes=64), "ops": {}}
    assert run_child(job)["report"]["limits"]["processes"] == 64


def test_no_new_privs_is_set(layout: Layout) -> None:
    """/proc/<pid>/status of the sandboxed child says NoNewPrivs: 1."""
    hold_r, hold_w = os.pipe()
    job = {"probe": "hold", "spec": layout.spec(keep_fds=[hold_r]), "hold_fd": hold_r}
    try:
        with started(job, pass_fds=(hold_r,)) as child:
            os.close(hold_r)
            pid = child.receive()["ready"]
            status = Path(f"/proc/{pid}/status").read_text()
            os.close(hold_w)
            hold_w = -1
            assert "result" in child.receive()
    finally:
        if hold_w >= 0:
            os.close(hold_w)
    assert "NoNewPrivs:\t1" in status


# Stands between the test and the sandboxed child, then exits when the test closes its hold
# pipe: the child's parent dies while the child sleeps.
INTERMEDIATE_PARENT = """
import marshal, os, subprocess, sys
child, payload = sys.argv[1], sys.argv[2]
job = marshal.loads(bytes.fromhex(payload))
subprocess.Popen([sys.executable, child, payload], pass_fds=(job["result_fd"],))
os.close(job["result_fd"])
os.read(job["hold_fd"], 1)
os._exit(0)
"""


def test_parent_death_kills_the_child(layout: Layout) -> None:
    """When the host's parent exits, the host gets SIGKILL (its end of the pipe closes)."""
    hold_r, hold_w = os.pipe()
    job = {"probe": "sleep", "spec": layout.spec(), "hold_fd": hold_r}
    argv = [sys.executable, "-c", INTERMEDIATE_PARENT, str(CHILD)]
    died = False
    with started(job, pass_fds=(hold_r,), argv=argv) as parent:
        os.close(hold_r)
        pid = parent.receive()["ready"]
        os.close(hold_w)  # the intermediate parent exits
        try:
            died = parent.closed_within(5.0)
        finally:
            if not died:
                os.kill(pid, signal.SIGKILL)  # the grandchild this test started
    assert died


def test_refuses_when_the_parent_is_not_the_expected_one(layout: Layout) -> None:
    """A parent pid that does not match (the supervisor died first) is sandbox_parent_gone."""
    job = {"probe": "ops", "spec": layout.spec(parent_pid=os.getppid()), "ops": {}}
    assert run_child(job)["error"] == "sandbox_parent_gone"


def test_refuses_a_multi_threaded_process(layout: Layout) -> None:
    """A thread started before apply would escape the sandbox, so apply refuses."""
    job = {"probe": "ops", "spec": layout.spec(), "ops": {}, "start_thread": True}
    assert run_child(job)["error"] == "sandbox_failed"


def test_cannot_signal_the_parent(layout: Layout, landlock_abi: int) -> None:
    """With the signal scope (ABI 6+), os.kill on the daemon is EPERM; on itself, allowed."""
    if landlock_abi < 6:
        pytest.skip(f"Landlock ABI {landlock_abi} has no scopes (needs 6)")
    result = run_child({"probe": "signal", "spec": layout.spec()})["result"]
    assert result == {"parent": "PermissionError", "self": "ok"}


def test_cannot_reach_an_abstract_socket_outside(layout: Layout, landlock_abi: int) -> None:
    """With the abstract-socket scope (ABI 6+), connecting to the daemon's socket is EPERM."""
    if landlock_abi < 6:
        pytest.skip(f"Landlock ABI {landlock_abi} has no scopes (needs 6)")
    address = f"\0aisoc-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(address)
        listener.listen(1)
        result = run_child({"probe": "connect", "spec": layout.spec(), "address": address})
    assert result["result"] == {"connect": "PermissionError"}


def test_require_refuses_without_landlock(layout: Layout) -> None:
    """Mode "require" on a kernel without Landlock (simulated) is sandbox_landlock_unavailable."""
    job = {"probe": "ops", "spec": layout.spec(landlock="require"), "ops": {}, "unavailable": True}
    assert run_child(job)["error"] == "sandbox_landlock_unavailable"


def test_auto_runs_on_without_landlock_and_says_why(layout: Layout) -> None:
    """Mode "auto" on a kernel without Landlock (simulated) reports the reason, unrestricted."""
    job = {
        "probe": "ops",
        "spec": layout.spec(landlock="auto"),
        "ops": {"tokens": ("read", str(layout.tokens_file))},
        "unavailable": True,
    }
    message = run_child(job)
    assert message["report"]["landlock_status"] == "kernel_without_landlock"
    assert message["result"] == {"tokens": "ok"}


def test_off_skips_landlock(layout: Layout) -> None:
    """Mode "off" applies everything but Landlock, and says so."""
    job = {
        "probe": "ops",
        "spec": layout.spec(landlock="off"),
        "ops": {"tokens": ("read", str(layout.tokens_file))},
    }
    message = run_child(job)
    assert message["report"]["landlock_status"] == "off"
    assert message["result"] == {"tokens": "ok"}


def _spec(**overrides: Any) -> sandbox.SandboxSpec:
    args: dict[str, Any] = {
        "parent_pid": 1,
        "keep_fds": [3],
        "environment": {"PATH": "/usr/bin"},
        "python_paths": PYTHON,
    }
    return sandbox.build_spec(**{**args, **overrides})


def _access(spec: sandbox.SandboxSpec, path: str) -> Access:
    return next(r.access for r in spec.rules if r.path == Path(path))


def test_python_and_system_libraries_are_read_and_execute() -> None:
    """The interpreter and the libraries may be read and executed, nothing more."""
    spec = _spec()
    assert _access(spec, "/opt/python") == sandbox.READ_EXEC
    assert _access(spec, "/usr/lib") == sandbox.READ_EXEC


def test_system_files_are_read_only() -> None:
    """TLS roots, name-service files and time zones are read-only."""
    spec = _spec()
    for path in ("/etc/ssl", "/etc/resolv.conf", "/usr/share/zoneinfo", "/dev/urandom"):
        assert _access(spec, path) == sandbox.READ


def test_plugin_dirs_are_read_only_and_write_paths_writable() -> None:
    """Plugin dirs get READ; write paths get READ_WRITE, which has no execute or mknod."""
    spec = _spec(plugin_dirs=[Path("/p/me")], write_paths=[Path("/s/me")])
    assert _access(spec, "/p/me") == sandbox.READ
    assert _access(spec, "/s/me") == sandbox.READ_WRITE
    assert not sandbox.READ_WRITE & (Access.EXECUTE | Access.MAKE_CHAR | Access.MAKE_BLOCK)


def test_dev_null_is_writable() -> None:
    """/dev/null takes writes and O_TRUNC (open(os.devnull, "w"))."""
    assert _access(_spec(), "/dev/null") == sandbox.DEVICE_READ_WRITE


def test_paths_are_normalised_and_merged() -> None:
    """The same path given twice is one rule carrying both grants."""
    spec = _spec(plugin_dirs=[Path("/x/./a/")], write_paths=[Path("/x/a")])
    assert _access(spec, "/x/a") == sandbox.READ | sandbox.READ_WRITE
    assert [r.path for r in spec.rules].count(Path("/x/a")) == 1


@pytest.mark.parametrize(
    "name", ["NOTIFY_SOCKET", "AISOC_PLUGIND_TOKEN", "aisoc_x", "LISTEN_FDS", "GITHUB_TOKEN"]
)
def test_refuses_leaky_variables(name: str) -> None:
    """A host environment with systemd hand-offs, AISOC_* or tokens is refused."""
    with pytest.raises(SandboxError) as caught:
        _spec(environment={"PATH": "/usr/bin", name: "x"})
    assert caught.value.code == "sandbox_policy_invalid"


def test_refuses_a_grant_that_holds_a_protected_path() -> None:
    """read_paths=["/etc"] would expose the tokens file listed as protected."""
    with pytest.raises(SandboxError) as caught:
        _spec(read_paths=[Path("/etc")], protected=[Path("/etc/aisoc-plugind/tokens.json")])
    assert caught.value.code == "sandbox_policy_invalid"


def test_accepts_protected_paths_outside_every_grant() -> None:
    """A protected file beside (not under) the grants is fine."""
    spec = _spec(write_paths=[Path("/var/lib/x/state/me")], protected=[Path("/var/lib/x/keys")])
    assert spec.landlock == "auto"


@pytest.mark.parametrize(
    "overrides",
    [
        {"write_paths": [Path("relative/dir")]},
        {"memory_mb": 0},
        {"max_open_files": 4},
        {"max_processes": 0},
        {"keep_fds": [-1]},
        {"landlock": "sometimes"},
    ],
)
def test_refuses_malformed_policies(overrides: dict[str, Any]) -> None:
    """Relative paths, empty budgets, too few descriptors, unknown modes are refused."""
    with pytest.raises(SandboxError) as caught:
        _spec(**overrides)
    assert caught.value.code == "sandbox_policy_invalid"


def test_host_environment_passes_only_the_basics() -> None:
    """PATH and LANG pass; TMPDIR and HOME are the host's; everything else stays behind."""
    source = {"PATH": "/bin", "LANG": "C.UTF-8", "SHELL": "/bin/sh", **LEAKY_ENV}
    env = sandbox.host_environment(source, tmp_dir=Path("/t"), home=Path("/h"))
    assert env == {"PATH": "/bin", "LANG": "C.UTF-8", "TMPDIR": "/t", "HOME": "/h"}


def test_interpreter_paths_cover_the_running_interpreter() -> None:
    """The resolved binary, stdlib and this package lie under the returned paths."""
    roots = sandbox.interpreter_paths()
    needed = [
        Path(os.path.realpath(sys.executable)),
        Path(os.path.realpath(os.__file__)),
        Path(os.path.realpath(sandbox.__file__)),
    ]
    for path in needed:
        assert any(path == r or r in path.parents for r in roots), path
