"""Scanning many plugin directories in real worker processes gives what scanning here gives.

The pool must never change an outcome: same bundles, manifests, trust decisions and errors,
in the same order, whether a directory was scanned by a worker, by this process while the
workers started, or again after a worker died. Workers are real `python -I -m
aisoc_plugind.engine.scan` processes; the ones this module kills are its own, by PID.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import nacl.signing
import pytest

from aisoc_plugind.core.signing import SignatureStatus, TrustMode
from aisoc_plugind.engine import loading, scanpool
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.engine.scan import Scanned, from_wire, scan, to_wire
from aisoc_plugind.engine.scanpool import POOL_MIN, ScanPool, scan_here
from aisoc_plugind.errors import BundleError, ManifestError
from tests.conftest import UNTRUSTED_PUB, Env, ManagerFactory, PluginFactory


def _variety(plugins: PluginFactory, count: int) -> list[Path]:
    """`count` directories of every kind: good, unsigned, badly signed, broken manifest,
    a symlink inside, a package with a submodule, code that does not compile."""
    paths = []
    for i in range(count):
        kind = i % 7
        name = f"p{i:03d}"
        if kind == 0:
            path = plugins.write(name)
        elif kind == 1:
            path = plugins.write(name, sign=False)
        elif kind == 2:
            path = plugins.write(name)
            (path / "plugin.py").write_text(
                "class Plugin:\n    def run(self, p, c):\n        return 1\n"
            )
        elif kind == 3:
            path = plugins.write(name)
            (path / "plugin.yaml").write_text("id: [unclosed\n")
        elif kind == 4:
            path = plugins.write(name)
            (path / "extra.py").symlink_to("/etc/hostname")
        elif kind == 5:
            path = plugins.write(
                name,
                code="from .pkg.helper import VALUE\nclass Plugin:\n    def run(self, p, c):\n"
                "        return {'v': VALUE}\n",
                files={"pkg/__init__.py": "", "pkg/helper.py": "VALUE = 7\n"},
                manifest_extra={"config_schema": {"type": "object"}},
            )
        else:
            path = plugins.write(name, code="def broken(:\n")
        paths.append(path)
    return paths


def _shape(item: Scanned) -> tuple[object, ...]:
    """What must be equal between two scans of one directory."""
    d = item.decision
    return (
        item.path,
        type(item.error).__name__ if item.error else None,
        item.error.code if item.error else None,
        item.error.message if item.error else None,
        dict(item.bundle.sources) if item.bundle else None,
        item.bundle.signature if item.bundle else None,
        item.manifest.plain if item.manifest else None,
        (d.status, d.key_id, d.allowed, d.digest_hex) if d else None,
        sorted(item.code) if item.code is not None else None,
        item.schema_checked,
    )


def _keys(env: Env) -> Mapping[str, nacl.signing.VerifyKey]:
    return load_keyring(env.keys).keys


async def _run(
    pool: ScanPool, paths: list[Path], keys: Mapping[str, nacl.signing.VerifyKey]
) -> tuple[list[Scanned], int]:
    out: list[Scanned] = []
    async with pool.session(paths, TrustMode.STRICT, keys, compile_code=True) as session:
        while (chunk := await session.next_chunk()) is not None:
            out.extend(chunk)
        by_workers = session.scanned_by_workers
    return out, by_workers


async def test_workers_give_the_same_results_in_the_same_order(
    env: Env, plugins: PluginFactory
) -> None:
    paths = _variety(plugins, POOL_MIN + 33)
    keys = _keys(env)
    expected = scan_here(paths, TrustMode.STRICT, keys, True)
    got, by_workers = await _run(ScanPool(2, help_locally=False), paths, keys)
    assert by_workers > 0  # real worker processes scanned some of them
    assert [_shape(g) for g in got] == [_shape(e) for e in expected]
    kinds = {(type(g.error).__name__ if g.error else g.decision.status) for g in got if g}
    assert {"BundleError", "ManifestError", SignatureStatus.VERIFIED} <= kinds
    assert SignatureStatus.UNSIGNED in kinds and SignatureStatus.INVALID in kinds


async def test_the_compiled_code_is_the_code_of_the_verified_bytes(
    env: Env, plugins: PluginFactory
) -> None:
    """What a worker compiled runs like a local compile of the same bytes."""
    paths = [
        plugins.write(
            f"c{i:03d}",
            code=f"X = {i}\nclass Plugin:\n    def run(self, p, c):\n        return X\n",
        )
        for i in range(POOL_MIN)
    ]
    got, _ = await _run(ScanPool(2, help_locally=False), paths, _keys(env))
    for i, item in enumerate(got):
        assert item.code is not None
        namespace: dict[str, object] = {}
        exec(item.code["plugin.py"], namespace)
        assert namespace["X"] == i
        assert item.code["plugin.py"].co_filename == str(paths[i] / "plugin.py")


async def test_few_directories_are_scanned_here(env: Env, plugins: PluginFactory) -> None:
    paths = _variety(plugins, 10)
    got, by_workers = await _run(ScanPool(2), paths, _keys(env))
    assert by_workers == 0
    assert [_shape(g) for g in got] == [
        _shape(e) for e in scan_here(paths, TrustMode.STRICT, _keys(env), True)
    ]


async def test_a_worker_that_cannot_start_leaves_the_work_to_this_process(
    env: Env, plugins: PluginFactory, tmp_path: Path
) -> None:
    paths = _variety(plugins, POOL_MIN + 5)
    missing = ScanPool(2, command=[str(tmp_path / "no-such-python")])
    got, by_workers = await _run(missing, paths, _keys(env))
    assert by_workers == 0
    assert len(got) == len(paths)
    wrong = ScanPool(
        1,
        command=[
            sys.executable,
            "-c",
            "import sys; sys.stdout.buffer.write(b'\\x00\\x00\\x00\\x02N.')",
        ],
    )
    got, by_workers = await _run(wrong, paths, _keys(env))  # answers with another "magic"
    assert by_workers == 0
    assert [_shape(g) for g in got] == [
        _shape(e) for e in scan_here(paths, TrustMode.STRICT, _keys(env), True)
    ]


async def test_a_worker_killed_mid_session_loses_nothing(
    env: Env, plugins: PluginFactory, tmp_path: Path
) -> None:
    """A worker that dies after its first answer: its chunks in flight are scanned again."""
    paths = _variety(plugins, POOL_MIN * 2)
    script = tmp_path / "dies.py"
    script.write_text(
        "import os, signal, sys\n"
        "from aisoc_plugind.engine import scan\n"
        "real = scan.scan\n"
        "count = 0\n"
        "def dying(*a, **k):\n"
        "    global count\n"
        "    count += 1\n"
        "    if count > 20:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "scan.scan = dying\n"
        "sys.exit(scan.worker_main())\n"
    )
    pool = ScanPool(2, command=[sys.executable, str(script)], help_locally=False)
    got, by_workers = await _run(pool, paths, _keys(env))
    assert 0 < by_workers < len(paths)
    expected = scan_here(paths, TrustMode.STRICT, _keys(env), True)
    assert [_shape(g) for g in got] == [_shape(e) for e in expected]


def test_the_wire_shape_round_trips(env: Env, plugins: PluginFactory) -> None:
    keys = _keys(env)
    for path in _variety(plugins, 14):
        item = scan(path, TrustMode.STRICT, keys, compile_code=True)
        assert _shape(from_wire(to_wire(item))) == _shape(item)


def test_trust_modes_decide_in_the_scan(env: Env, plugins: PluginFactory) -> None:
    unsigned = plugins.write("u", sign=False)
    strict = scan(unsigned, TrustMode.STRICT, _keys(env), compile_code=True)
    warn = scan(unsigned, TrustMode.WARN, _keys(env), compile_code=True)
    assert strict.decision is not None and not strict.decision.allowed
    assert strict.code is None  # nothing is compiled for code that will not run
    assert warn.decision is not None and warn.decision.allowed and warn.code
    other = load_keyring(UNTRUSTED_PUB.parent).keys
    signed = plugins.write("s")
    assert (
        scan(signed, TrustMode.STRICT, other, compile_code=False).decision.status
        is SignatureStatus.INVALID
    )  # type: ignore[union-attr]


def test_scan_errors_are_coded(env: Env, plugins: PluginFactory, tmp_path: Path) -> None:
    gone = scan(tmp_path / "nothing", TrustMode.STRICT, _keys(env), compile_code=False)
    assert isinstance(gone.error, BundleError)
    bad = plugins.write("bad")
    (bad / "plugin.yaml").write_text("id: a\nid: b\n")
    dup = scan(bad, TrustMode.STRICT, _keys(env), compile_code=False)
    assert isinstance(dup.error, ManifestError) and dup.error.code == "manifest_duplicate_key"


@pytest.mark.skipif(not hasattr(os, "getpgid"), reason="POSIX only")
async def test_workers_get_a_minimal_environment(
    env: Env, plugins: PluginFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No AISOC_*, NOTIFY_SOCKET or anything else of the daemon's environment reaches them."""
    monkeypatch.setenv("AISOC_PLUGIND_SECRET_TEST", "do-not-leak")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/nothing")
    out = tmp_path / "env.txt"
    script = tmp_path / "envdump.py"
    script.write_text(
        "import os, sys\n"
        f"open({str(out)!r}, 'w').write(repr(sorted(os.environ)))\n"
        "from aisoc_plugind.engine import scan\n"
        "sys.exit(scan.worker_main())\n"
    )
    paths = _variety(plugins, POOL_MIN)
    await _run(
        ScanPool(1, command=[sys.executable, str(script)], help_locally=False), paths, _keys(env)
    )
    names = eval(out.read_text())
    assert set(names) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE"}
    assert signal.SIGKILL  # (POSIX)


async def test_a_discovery_through_workers_equals_one_without(
    env: Env, plugins: PluginFactory, make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One varied tree discovered by scan workers only, and without any: the same records
    and, per plugin, the same events in the same order."""
    _variety(plugins, POOL_MIN + 9)
    from_workers: list[object] = []
    real_from_wire = scanpool.from_wire

    def counting(wire: tuple[object, ...]) -> Scanned:
        from_workers.append(wire)
        return real_from_wire(wire)

    monkeypatch.setattr(scanpool, "from_wire", counting)
    outcomes = []
    for workers in (2, 0):
        mark = len(env.audit_events()) if env.audit.exists() else 0
        monkeypatch.setattr(loading, "ScanPool", functools.partial(ScanPool, help_locally=False))
        manager = await make_manager(scan_workers=workers)
        result = await manager.discover()
        env.flush()
        events = env.audit_events()[mark:]
        per_plugin: dict[str, list[str]] = {}
        for event in events:
            if event.get("path", "").startswith(str(plugins.root)):
                per_plugin.setdefault(event["path"], []).append(event["event"])
        records = sorted(
            (r.id, r.state.value, r.signature_status, r.digest, (r.error or {}).get("code"))
            for r in manager.records()
        )
        outcomes.append((sorted(result.discovered), len(result.failed), records, per_plugin))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] and outcomes[0][1]  # some loaded, some failed
    assert len(from_workers) == POOL_MIN + 9  # the first discovery was scanned by workers


@pytest.mark.parametrize("workers", [2, 0], ids=["in workers", "here"])
async def test_the_scan_makes_the_state_directories_of_admitted_plugins_only(
    env: Env, plugins: PluginFactory, tmp_path: Path, workers: int
) -> None:
    """For process isolation the scan makes each admitted version's `state_dir/<id>/` (0700)
    as it goes, in the workers and here, so the host's start does not make them all at
    once; a refused, invalid or broken directory gets none."""
    paths = _variety(plugins, POOL_MIN + 33)
    state = tmp_path / "state"
    out: list[Scanned] = []
    pool = ScanPool(workers, help_locally=False)
    async with pool.session(
        paths, TrustMode.STRICT, _keys(env), compile_code=True, state_root=state
    ) as session:
        while (chunk := await session.next_chunk()) is not None:
            out.extend(chunk)
        by_workers = session.scanned_by_workers
    assert (by_workers > 0) == (workers > 0)
    allowed = {i.manifest.id for i in out if i.manifest and i.decision and i.decision.allowed}
    refused = {i.manifest.id for i in out if i.manifest and i.decision and not i.decision.allowed}
    assert allowed and refused
    assert {p.name for p in state.iterdir()} == allowed
    assert all((state / i).stat().st_mode & 0o777 == 0o700 for i in allowed)


def test_no_state_root_means_no_state_directories(
    env: Env, plugins: PluginFactory, tmp_path: Path
) -> None:
    """In-process mode asks for none: the scan writes nothing."""
    paths = _variety(plugins, 7)
    before = sorted(p for p in tmp_path.rglob("*"))
    scan_here(paths, TrustMode.STRICT, _keys(env), True)
    assert sorted(p for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("plugin_id", ["", ".", "..", "../escape", "a/b", "nul\0id"])
def test_a_state_directory_is_never_made_outside_the_root(tmp_path: Path, plugin_id: str) -> None:
    """The id comes from a checked manifest; even so, no id reaches outside the root."""
    from aisoc_plugind.engine.scan import make_state_dir

    root = tmp_path / "state"
    root.mkdir()
    make_state_dir(root, plugin_id)
    assert list(root.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_a_state_directory_that_cannot_be_made_is_left_to_the_host(tmp_path: Path) -> None:
    """A root that is a file: no error here (the host's start reports it)."""
    from aisoc_plugind.engine.scan import make_state_dir

    (tmp_path / "state").write_text("not a directory")
    make_state_dir(tmp_path / "state", "acme.geoip")
    assert (tmp_path / "state").read_text() == "not a directory"
