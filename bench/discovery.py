"""Cold discovery of N signed plugins: the daemon's engine against a naive importlib loader.

    .venv/bin/python bench/discovery.py [--plugins 1000] [--rounds 5] [--isolation process|none]
        [--profile] [--no-docs]

One temp tree holds N plugin directories shaped like the example enricher
(examples/plugins/shodan-enricher: plugin.py, plugin.yaml with a config_schema) and a
plugin.sig by a throwaway Ed25519 key. Each round runs, each in a
fresh interpreter (cold: nothing imported, no bytecode cache) and in alternating order:

- ours: `PluginManager.discover()` with `--isolation process` (the default: plugins are
  loaded into a sandboxed host process; hosts start inside the timed window) or `none`
  (in the daemon), strict trust,
  `audit.fsync = "always"` (every event durable before discover returns), events to an audit
  file; the clock runs from the call to its return (every plugin enabled, every line fsynced).
  The scan worker processes start inside that window.
- naive: a loop of `yaml.safe_load(plugin.yaml)`, `importlib.util.spec_from_file_location`,
  `exec_module`, `Plugin()` over the same directories, with the interpreter's defaults (it
  writes `__pycache__`, as Python does), on a fresh copy of the tree each round so no
  bytecode is cached. No signature check, no events.
- naive, no bytecode written (`PYTHONDONTWRITEBYTECODE=1`): shown for reference.

Both read the same files from the page cache. The medians of the rounds are compared; with
`--profile`, one more run of ours reports where the time goes. Results go to stdout and to
the discovery section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nacl.signing
from benchdoc import markers, replace_section

ROOT = Path(__file__).resolve().parents[1]
TARGET_MS = 0.5
TARGET_RATIO = 0.5
MODES = {"process": "plugins in a sandboxed host process", "none": "in-process mode"}


# The project's own example enricher (examples/plugins/shodan-enricher), one table row made
# unique per plugin.
PLUGIN = '''"""Bench plugin {i}: an offline stand-in for a Shodan lookup."""

SAMPLE = {{
    "1.1.1.1": {{"ports": [53, 80, 443], "tags": ["dns", "cdn"], "org": "Cloudflare"}},
    "10.0.{a}.{b}": {{"ports": [22, 443], "tags": ["bench"], "org": "Bench {i}"}},
}}


class Plugin:
    def __init__(self, config):
        self.default_tags = list(config.get("default_tags", []))

    async def run(self, payload, context):
        ip = str(payload.get("ip", ""))
        hit = SAMPLE.get(ip)
        if hit is None:
            return {{"ip": ip, "found": False, "tags": self.default_tags}}
        return {{"ip": ip, "found": True, **hit, "tags": hit["tags"] + self.default_tags}}
'''

MANIFEST = """# Bench plugin {i}, shaped like examples/plugins/shodan-enricher.
id: bench.p{i:04d}
name: Bench enricher {i}
version: 1.0.{i}
plugin_type: enricher
description: Adds open ports and tags for an IP address from a built-in sample table.
author: aisoc-plugind bench
license: Apache-2.0
tags: [enricher, bench]
config_schema:
  type: object
  properties:
    default_tags:
      type: array
      items: {{type: string}}
"""

NAIVE = """
import importlib.util, sys, time, yaml
from pathlib import Path
root = Path(sys.argv[1])
dirs = sorted(root.iterdir())
started = time.perf_counter()
for d in dirs:
    m = yaml.safe_load((d / "plugin.yaml").read_text())
    name = "naive_" + m["id"].replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, d / "plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.Plugin({})
print((time.perf_counter() - started) * 1000 / len(dirs))
"""


def make_tree(root: Path, count: int) -> tuple[Path, Path]:
    """Write `count` signed plugins and the key that signed them; return (plugins, keys)."""
    from aisoc_plugind.core import manifest, signing

    key = nacl.signing.SigningKey.generate()
    keys, plugins = root / "keys", root / "plugins"
    keys.mkdir(parents=True)
    (keys / "bench.pem").write_bytes(signing.public_key_pem(key.verify_key))
    for i in range(count):
        d = plugins / f"p{i:04d}"
        d.mkdir(parents=True)
        code = PLUGIN.format(i=i, a=i // 250, b=i % 250).encode()
        text = MANIFEST.format(i=i).encode()
        digest = signing.plugin_digest(manifest.parse(text).as_json(), {"plugin.py": code})
        (d / "plugin.py").write_bytes(code)
        (d / "plugin.yaml").write_bytes(text)
        (d / "plugin.sig").write_bytes(signing.encode_signature(signing.sign_digest(digest, key)))
    return plugins, keys


async def _discover(
    plugins: Path, keys: Path, audit: Path, profile: Path | None, isolation: str
) -> dict[str, Any]:
    from aisoc_plugind.audit.log import EventLog, log_options
    from aisoc_plugind.config.settings import FsyncPolicy, Settings
    from aisoc_plugind.engine.keyring import load_keyring
    from aisoc_plugind.service.wiring import make_manager

    settings = Settings(
        plugins_dir=plugins,
        keys_dir=keys,
        audit_path=audit,
        tokens_file=audit.parent / "tokens.toml",
        state_dir=audit.parent / "state",
        environment="development",
        watch=False,
        audit_fsync=FsyncPolicy.ALWAYS,
        isolation_mode=isolation,
    )
    devnull = open(os.devnull, "w")  # noqa: SIM115, ASYNC230 - before anything runs
    events = EventLog(log_options(settings), stream=devnull)
    events.start()
    profiler = cProfile.Profile() if profile else None
    try:
        async with make_manager(settings, events, load_keyring(keys)) as manager:
            before = _thread_cpu()
            cpu, started = time.process_time(), time.perf_counter()
            if profiler:
                profiler.enable()
            result = await manager.discover()
            if profiler:
                profiler.disable()
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            enabled = sum(1 for r in manager.records() if r.state.value == "enabled")
            threads = {k: v - before.get(k, 0.0) for k, v in _thread_cpu().items()}
    finally:
        events.close()
    if profiler and profile:
        profiler.dump_stats(profile)
    count = len(result.discovered) + len(result.failed)
    return {
        "ms_per_plugin": elapsed * 1000 / max(count, 1),
        "enabled": enabled,
        "failed": len(result.failed),
        "process_cpu_ms_per_plugin": cpu * 1000 / max(count, 1),
        "audit_lines": sum(1 for _ in audit.open("rb")),
        "threads_cpu_ms": threads,
    }


def _thread_cpu() -> dict[str, float]:
    """Return CPU milliseconds per thread name of this process so far (Linux /proc)."""
    import threading

    names = {t.native_id: t.name.split(" ")[0] for t in threading.enumerate()}
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = names.get(int(task.name), "other")
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) * 1000 / tick
    return out


def child(argv: list[str]) -> int:
    """`--child ISOLATION PLUGINS KEYS AUDIT [PROFILE]`: one cold run of ours; JSON on stdout."""
    import anyio

    isolation, rest = argv[0], argv[1:]
    plugins, keys, audit = (Path(a) for a in rest[:3])
    profile = Path(rest[3]) if len(rest) > 3 else None
    print(json.dumps(anyio.run(_discover, plugins, keys, audit, profile, isolation)))
    return 0


def run_ours(
    plugins: Path, keys: Path, work: Path, isolation: str, profile: Path | None = None
) -> dict[str, Any]:
    audit = work / f"audit-{time.monotonic_ns()}.jsonl"
    args = [sys.executable, __file__, "--child", isolation, str(plugins), str(keys), str(audit)]
    out = subprocess.run(
        [*args, *([str(profile)] if profile else [])],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_naive(plugins: Path, work: Path, *, bytecode: bool) -> float:
    fresh = work / f"naive-{time.monotonic_ns()}"
    shutil.copytree(plugins, fresh)  # no __pycache__ from an earlier round
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", NAIVE, str(fresh)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    shutil.rmtree(fresh)
    return float(out.stdout.strip())


def where_time_goes(profile: Path) -> list[str]:
    """Return the top functions of the main thread by own time (from a cProfile dump)."""
    stats = pstats.Stats(str(profile))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    lines = ["| own time % | calls | function |", "|---:|---:|---|"]
    for (file, line, name), (_, calls, own, _, _) in rows[:12]:
        where = f"{Path(file).name}:{line}" if line else file
        lines.append(f"| {100 * own / total:.1f} | {calls} | `{name}` ({where}) |")
    return lines


def render(
    rounds: list[dict[str, Any]], count: int, argv: list[str], profile: list[str], isolation: str
) -> str:
    begin, end = markers("discovery", isolation)
    ours = statistics.median(r["ours"] for r in rounds)
    naive = statistics.median(r["naive"] for r in rounds)
    naive_nopyc = statistics.median(r["naive_nopyc"] for r in rounds)
    ratio = ours / naive
    cpu = statistics.median(r["cpu"] for r in rounds)
    ok = ours <= TARGET_MS and ratio <= TARGET_RATIO
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    rows = [
        f"| {i + 1} | {r['ours']:.3f} | {r['naive']:.3f} | {r['ours'] / r['naive']:.2f} "
        f"| {r['naive_nopyc']:.3f} | {r['cpu']:.3f} |"
        for i, r in enumerate(rounds)
    ]
    return "\n".join(
        [
            begin,
            f"## Cold discovery of {count} signed plugins ({MODES[isolation]})",
            "",
            "`PluginManager.discover()` in a fresh interpreter: strict trust, every event",
            'fsync\'ed (`audit.fsync = "always"`), scan worker processes started inside the',
            "timed window; against a naive importlib loader (YAML + `spec_from_file_location` +",
            "`exec_module` + `Plugin()`, interpreter defaults, no bytecode cached) on the same",
            "directories, each round in fresh processes. See bench/discovery.py.",
            "",
            f"Command: `.venv/bin/python bench/discovery.py {' '.join(argv)}`".rstrip(),
            f"Date: {today}; machine: {os.cpu_count()} CPUs ({platform.machine()}), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}.",
            "",
            "| round | ours ms/plugin | naive ms/plugin | ratio | naive, no bytecode written "
            "| ours process CPU ms/plugin |",
            "|---:|---:|---:|---:|---:|---:|",
            *rows,
            f"| **median** | **{ours:.3f}** | **{naive:.3f}** | **{ratio:.2f}** "
            f"| {naive_nopyc:.3f} | {cpu:.3f} |",
            "",
            f"Target: at most {TARGET_MS} ms per plugin "
            f"and at most {TARGET_RATIO} times the naive loader: {'met' if ok else 'NOT met'}.",
            "",
            *(
                ["Where the main thread's time goes (one more run under cProfile):", "", *profile]
                if profile
                else []
            ),
            end,
        ]
    )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--isolation", choices=sorted(MODES), default="process")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aisoc-discovery-bench-") as tmp:
        work = Path(tmp)
        plugins, keys = make_tree(work / "tree", args.plugins)
        rounds = []
        for i in range(args.rounds):
            first_ours = i % 2 == 0
            if first_ours:
                ours = run_ours(plugins, keys, work, args.isolation)
            naive = run_naive(plugins, work, bytecode=True)
            naive_nopyc = run_naive(plugins, work, bytecode=False)
            if not first_ours:
                ours = run_ours(plugins, keys, work, args.isolation)
            if ours["enabled"] != args.plugins or ours["failed"]:
                print(f"error: ours enabled {ours['enabled']} of {args.plugins}", file=sys.stderr)
                return 1
            rounds.append(
                {
                    "ours": ours["ms_per_plugin"],
                    "naive": naive,
                    "naive_nopyc": naive_nopyc,
                    "cpu": ours["process_cpu_ms_per_plugin"],
                }
            )
            print(
                f"round {i + 1}: ours {ours['ms_per_plugin']:.3f} ms/plugin, naive {naive:.3f}, "
                f"threads {ours['threads_cpu_ms']}"
            )
        profile: list[str] = []
        if args.profile:
            run_ours(plugins, keys, work, args.isolation, work / "ours.prof")
            profile = where_time_goes(work / "ours.prof")
    section = render(rounds, args.plugins, sys.argv[1:], profile, args.isolation)
    print(section.split("\n", 1)[1].rsplit("\n", 1)[0])
    if not args.no_docs:
        replace_section(section, *markers("discovery", args.isolation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
