"""The Landlock binding: ABI tables, the real kernel's answers, and rules enforced in children.

The enforcing tests run `landlock.enforce` in a fresh child (`child.py`), which then tries
file operations and reports them over a pipe. They run as root, whom plain permissions never
stop, so every refusal is Landlock's. They are skipped on a kernel without Landlock.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Any

import pytest

from aisoc_plugind.engine.hosts import landlock
from aisoc_plugind.engine.hosts.landlock import Access, Scope
from tests.engine.hosts.children import Layout, run_child

V1 = Access(0x1FFF)  # the thirteen rights of ABI 1


@pytest.mark.parametrize(
    ("abi", "expected"),
    [
        (0, Access(0)),
        (1, V1),
        (2, V1 | Access.REFER),
        (3, V1 | Access.REFER | Access.TRUNCATE),
        (4, V1 | Access.REFER | Access.TRUNCATE),
        (5, V1 | Access.REFER | Access.TRUNCATE | Access.IOCTL_DEV),
        (7, V1 | Access.REFER | Access.TRUNCATE | Access.IOCTL_DEV),
    ],
)
def test_handled_access_follows_the_abi(abi: int, expected: Access) -> None:
    """Each ABI handles the rights it introduced and all earlier ones, never a later one."""
    assert landlock.handled_access(abi) == expected


@pytest.mark.parametrize(
    ("abi", "expected"),
    [(5, Scope(0)), (6, Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL), (7, Scope(3))],
)
def test_scopes_start_at_abi_6(abi: int, expected: Scope) -> None:
    """Signal and abstract-socket scopes exist from ABI 6."""
    assert landlock.handled_scopes(abi) == expected


@pytest.mark.parametrize(("abi", "size"), [(1, 8), (3, 8), (4, 16), (5, 16), (6, 24), (7, 24)])
def test_ruleset_attr_size_follows_the_abi(abi: int, size: int) -> None:
    """handled_access_fs, then handled_access_net (ABI 4), then scoped (ABI 6)."""
    assert landlock.ruleset_attr_size(abi) == size


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_syscall_numbers_are_the_generic_ones(machine: str) -> None:
    """x86_64 and aarch64 both use 444, 445, 446 (asm-generic/unistd.h)."""
    assert landlock.SYSCALL_NUMBERS[machine] == (444, 445, 446)


def test_path_beneath_attr_is_packed() -> None:
    """struct landlock_path_beneath_attr is packed: 8 + 4 bytes, no padding."""
    assert ctypes.sizeof(landlock._PathBeneathAttr) == 12


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (errno.ENOSYS, "kernel_without_landlock"),
        (errno.EOPNOTSUPP, "landlock_disabled"),
        (errno.EPERM, "landlock_blocked"),
        (errno.EINVAL, "probe_failed"),
    ],
)
def test_probe_errors_have_typed_reasons(err: int, reason: str) -> None:
    """Each way the version probe fails maps to one of UNAVAILABLE_REASONS."""
    assert landlock.unavailable_reason(err) == reason
    assert reason in landlock.UNAVAILABLE_REASONS


def test_probe_refuses_an_unknown_architecture() -> None:
    """A machine without known syscall numbers is unavailable, not a crash."""
    support = landlock.probe(machine="sparc64")
    assert isinstance(support, landlock.Unavailable)
    assert support.reason == "unsupported_architecture"


def test_probe_reads_the_kernel_abi(landlock_abi: int) -> None:
    """On this kernel the version probe answers a positive ABI."""
    assert landlock_abi >= 1


def test_enforce_on_an_unknown_architecture_fails_typed() -> None:
    """enforce() answers Failed instead of raising when it cannot make the syscalls."""
    outcome = landlock.enforce([], abi=1, machine="sparc64")
    assert isinstance(outcome, landlock.Failed)
    assert outcome.step == "syscalls"


def _enforce(layout: Layout, abi: int, rules: list[tuple[Any, Access]], ops: dict[str, Any]) -> Any:
    job = {
        "probe": "ops",
        "abi": abi,
        "rules": [(str(path), int(access)) for path, access in rules],
        "ops": {name: (op, str(path)) for name, (op, path) in ops.items()},
    }
    return run_child(job)


READ = Access.READ_FILE | Access.READ_DIR


def test_a_read_rule_allows_reading_beneath_it(layout: Layout, landlock_abi: int) -> None:
    """Files under a READ rule can be read and listed."""
    rules = [(layout.plugin_dir, READ)]
    ops = {"read": ("read", layout.plugin_dir / "data.txt"), "list": ("list", layout.plugin_dir)}
    assert _enforce(layout, landlock_abi, rules, ops)["result"] == {"read": "ok", "list": "ok"}


def test_everything_else_is_denied(layout: Layout, landlock_abi: int) -> None:
    """Outside the rules, reading and writing are PermissionError."""
    rules = [(layout.plugin_dir, READ)]
    ops = {
        "read": ("read", layout.tokens_file),
        "write": ("write", layout.state_dir / "x.txt"),
    }
    result = _enforce(layout, landlock_abi, rules, ops)["result"]
    assert result == {"read": "PermissionError", "write": "PermissionError"}


def test_a_read_rule_does_not_allow_writing(layout: Layout, landlock_abi: int) -> None:
    """Read rights on a directory give no right to create or change files in it."""
    rules = [(layout.plugin_dir, READ)]
    ops = {
        "create": ("write", layout.plugin_dir / "new.txt"),
        "overwrite": ("write", layout.plugin_dir / "data.txt"),
    }
    result = _enforce(layout, landlock_abi, rules, ops)["result"]
    assert result == {"create": "PermissionError", "overwrite": "PermissionError"}


def test_missing_paths_are_skipped_not_fatal(layout: Layout, landlock_abi: int) -> None:
    """A rule on a path that does not exist is listed as skipped (ENOENT); the rest applies."""
    missing = layout.root / "does-not-exist"
    message = _enforce(layout, landlock_abi, [(missing, READ), (layout.plugin_dir, READ)], {})
    assert message["report"]["skipped"] == [(str(missing), "ENOENT")]
    assert [path for path, _ in message["report"]["granted"]] == [str(layout.plugin_dir)]


def test_a_rule_on_a_file_keeps_only_file_rights(layout: Layout, landlock_abi: int) -> None:
    """READ_DIR means nothing on a file: the granted rule carries READ_FILE alone."""
    target = layout.plugin_dir / "data.txt"
    message = _enforce(layout, landlock_abi, [(target, READ)], {"read": ("read", target)})
    assert message["report"]["granted"] == [(str(target), int(Access.READ_FILE))]
    assert message["result"] == {"read": "ok"}
