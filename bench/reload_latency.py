"""Measure hot-reload latency: last write of an edit -> `plugin.reload.completed`, in-process.

    .venv/bin/python bench/reload_latency.py [--iterations N] [--debounce-ms MS] [--no-docs]

A temp plugins dir holds one plugin signed with a throwaway Ed25519 key (its public PEM is
the only trusted key). A PluginManager and the real watcher component run in this process.
Each iteration is one edit as a signing tool makes it: rewrite plugin.py, plugin.yaml (new
version), then plugin.sig; the clock starts after the last write and stops when the
`plugin.reload.completed` event for that version is emitted. Every edit must produce exactly
one reload. Results go to stdout and to the reload-latency section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import nacl.signing
from benchdoc import replace_section

from aisoc_plugind.audit.log import EventLog, log_options
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.core import manifest as manifest_mod
from aisoc_plugind.core import signing
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.service.watcher import STEP_MS, watcher_component

MARK = "<!-- reload_latency debounce_ms={}:{} -->"
PLUGIN_ID = "bench.reloader"
TIMEOUT_S = 10.0
PAUSE_MAX_S = 0.05
CODE = """VERSION = {version!r}


class Plugin:
    def run(self, payload, context):
        return {{"version": VERSION}}
"""


@dataclass(eq=False)
class ReloadTap:
    """An EventLog listener: stamps each reload outcome with perf_counter() as it is emitted
    (on the event loop, the moment the engine reports it)."""

    completed: list[tuple[str, float]] = field(default_factory=list)
    reload_ms: list[float] = field(default_factory=list)
    failed: int = 0
    waiting: dict[str, anyio.Event] = field(default_factory=dict)

    EVENTS = ("plugin.reload.completed", "plugin.reload.failed")

    def __call__(self, event: Mapping[str, Any]) -> None:
        now = time.perf_counter()
        if event["event"] == "plugin.reload.completed":
            self.completed.append((event["version"], now))
            self.reload_ms.append(event["duration_ms"])
            if (waiter := self.waiting.pop(event["version"], None)) is not None:
                waiter.set()
        else:
            self.failed += 1


@dataclass(frozen=True)
class Edit:
    """The three files of one signed version, ready to be written."""

    version: str
    code: bytes
    manifest: bytes
    signature: bytes


def make_edit(version: str, key: nacl.signing.SigningKey) -> Edit:
    """Build (and sign, ahead of the clock) one version of the bench plugin."""
    code = CODE.format(version=version).encode()
    manifest = json.dumps(
        {"id": PLUGIN_ID, "name": "Reload bench", "version": version, "plugin_type": "enricher"}
    ).encode()
    parsed = manifest_mod.parse(manifest, "plugin.yaml")
    digest = signing.plugin_digest(parsed.as_json(), {"plugin.py": code})
    return Edit(
        version=version,
        code=code,
        manifest=manifest,
        signature=signing.encode_signature(signing.sign_digest(digest, key)),
    )


def write_edit(plugin_dir: Path, edit: Edit) -> float:
    """Write code, manifest, signature (in that order); return the time of the last write."""
    (plugin_dir / "plugin.py").write_bytes(edit.code)
    (plugin_dir / "plugin.yaml").write_bytes(edit.manifest)
    (plugin_dir / "plugin.sig").write_bytes(edit.signature)
    return time.perf_counter()


def setup_dirs(tmp: Path, key: nacl.signing.SigningKey, debounce_ms: int) -> Settings:
    """Create keys/, plugins/<bench> (version 0) and return settings that point at them."""
    (tmp / "keys").mkdir()
    (tmp / "keys" / "bench.pem").write_bytes(signing.public_key_pem(key.verify_key))
    plugin_dir = tmp / "plugins" / "reloader"
    plugin_dir.mkdir(parents=True)
    write_edit(plugin_dir, make_edit("0.0.0", key))
    return Settings(
        plugins_dir=tmp / "plugins",
        keys_dir=tmp / "keys",
        audit_path=tmp / "audit.jsonl",
        tokens_file=tmp / "tokens.toml",
        environment="development",
        watch=True,
        watch_debounce_ms=debounce_ms,
    )


@dataclass
class Result:
    """Latencies in ms and reload counts of one run."""

    latencies: list[float]
    reload_ms: list[float]
    reloads: int
    failed: int
    edits: int
    idle_cpu_pct: float
    debounce_ms: int

    def quantile(self, q: int) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]


async def run_bench(iterations: int, debounce_ms: int, idle_s: float) -> Result:
    key = nacl.signing.SigningKey.generate()
    with tempfile.TemporaryDirectory(prefix="aisoc-reload-bench-") as tmp_name:
        settings = setup_dirs(Path(tmp_name), key, debounce_ms)
        tap = ReloadTap()
        events = EventLog(log_options(settings), stream=io.StringIO())
        events.start()
        events.subscribe(tap, ReloadTap.EVENTS)
        try:
            async with PluginManager(settings, events, load_keyring(settings.keys_dir)) as manager:
                await manager.discover()
                async with watcher_component(None, manager):  # type: ignore[arg-type]
                    idle = await measure_idle_cpu(idle_s)
                    plugin_dir = settings.plugins_dir / "reloader"
                    latencies = await edit_loop(plugin_dir, key, tap, iterations)
                    await one_edit(plugin_dir, make_edit("9.9.9", key), tap)
        finally:
            await events.aclose()  # the writer is done with the temp dir before it goes
    reloads = sum(1 for version, _ in tap.completed if version != "9.9.9")
    return Result(
        latencies=latencies,
        reload_ms=tap.reload_ms,
        reloads=reloads,
        failed=tap.failed,
        edits=iterations,
        idle_cpu_pct=idle,
        debounce_ms=debounce_ms,
    )


async def measure_idle_cpu(seconds: float) -> float:
    """Return this process's CPU use (% of one core) while nothing changes on disk."""
    cpu, wall = time.process_time(), time.perf_counter()
    await anyio.sleep(seconds)
    return 100 * (time.process_time() - cpu) / (time.perf_counter() - wall)


async def edit_loop(
    plugin_dir: Path, key: nacl.signing.SigningKey, tap: ReloadTap, iterations: int
) -> list[float]:
    # A pause of random length (not measured) between edits: real edits do not arrive in
    # step with the watcher's wake-ups, and a fixed rhythm would measure one phase only.
    pauses = random.Random(4)
    latencies = []
    for i in range(iterations):
        await anyio.sleep(pauses.uniform(0, PAUSE_MAX_S))
        latencies.append(await one_edit(plugin_dir, make_edit(f"1.0.{i + 1}", key), tap))
    return latencies


async def one_edit(plugin_dir: Path, edit: Edit, tap: ReloadTap) -> float:
    """Apply one edit and wait for its reload; return the latency in ms."""
    done = tap.waiting[edit.version] = anyio.Event()
    last_write = write_edit(plugin_dir, edit)
    with anyio.fail_after(TIMEOUT_S):
        await done.wait()
    stamp = next(t for v, t in reversed(tap.completed) if v == edit.version)
    return (stamp - last_write) * 1000


def render(result: Result, argv: list[str]) -> str:
    """Return the markdown section for docs/benchmarks.md."""
    lat = result.latencies
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    command = " ".join(["bench/reload_latency.py", *argv]).strip()
    return "\n".join(
        [
            MARK.format(result.debounce_ms, "begin"),
            f"## Hot-reload latency (watcher, watch_debounce_ms = {result.debounce_ms})",
            "",
            "From the last write of an edit (plugin.py, plugin.yaml, plugin.sig) to the",
            "`plugin.reload.completed` event, in-process: real inotify watch, real Ed25519",
            "verification, import and swap, audit file with the default fsync policy.",
            "",
            f"Command: `.venv/bin/python {command}`",
            f"Date: {today}; machine: {os.cpu_count()} CPUs ({platform.machine()}), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}.",
            f"Settings: `plugins.watch_debounce_ms = {result.debounce_ms}`, watchfiles "
            f"step {STEP_MS} ms.",
            "",
            "| edits | median ms | p90 ms | p99 ms | max ms | reloads per edit | failed reloads "
            "| reload work median ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {result.edits} | {statistics.median(lat):.1f} | {result.quantile(90):.1f} "
            f"| {result.quantile(99):.1f} | {max(lat):.1f} | {result.reloads / result.edits:.2f} "
            f"| {result.failed} | {statistics.median(result.reload_ms):.1f} |",
            "",
            "Reload work = `duration_ms` of the event (read, verify, import, swap); the rest is",
            "detection (about 1.5 watchfiles steps) and the quiet window.",
            "",
            f"Idle: the process used {result.idle_cpu_pct:.2f} % of one CPU while nothing changed "
            f"(watchfiles wakes every {STEP_MS} ms to look at the inotify queue).",
            "",
            "Target: median <= 50 ms, p99 <= 150 ms, exactly 1 reload per edit.",
            MARK.format(result.debounce_ms, "end"),
        ]
    )


def update_doc(section: str, debounce_ms: int) -> None:
    """Replace this run's section in docs/benchmarks.md (other sections are kept)."""
    replace_section(section, MARK.format(debounce_ms, "begin"), MARK.format(debounce_ms, "end"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--debounce-ms", type=int, default=Settings().watch_debounce_ms)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    result = anyio.run(run_bench, args.iterations, args.debounce_ms, args.idle_seconds)
    section = render(result, sys.argv[1:])
    print(section.split("\n", 1)[1].rsplit("\n", 1)[0])
    if not args.no_docs:
        update_doc(section, args.debounce_ms)
    ok = result.reloads == result.edits and result.failed == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
