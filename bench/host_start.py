"""Plugin host start time and idle memory (isolation.mode = "process", group "plugin").

    .venv/bin/python bench/host_start.py [--hosts 50] [--rounds 3] [--no-docs]

Each round, in a fresh interpreter: a `ProcessHost` (the daemon's, with the sandbox the
daemon gives it: Landlock where the kernel has it, rlimits, clean environment) loads N small
plugins one after another, each into its own host (`isolation.group = "plugin"`). The start
time of one host is the time `ProcessHost.load()` takes for a plugin whose group has no host
yet: the zygote's fork, the sandbox, the host's HELLO, the LOAD of the plugin's verified
bytes, `Plugin()` and `setup()`, and the LOADED answer. The zygote itself starts once per
daemon (on the first load) and is reported apart. Then, with every host idle, each host's
private memory (USS: Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) is read.

Targets (issue: isolation): median host start <= 10 ms; idle USS <= 12 MiB per host.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchdoc import replace_section  # noqa: E402

BEGIN, END = "<!-- host_start:begin -->", "<!-- host_start:end -->"

PLUGIN = b"""\
class Plugin:
    def __init__(self, config):
        self.config = config

    def run(self, payload, context):
        return {"ok": True}
"""


def _uss_kib(pid: int) -> int:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return fields["Private_Clean"] + fields["Private_Dirty"]


async def _round(hosts: int, tmp: Path) -> dict[str, Any]:
    from aisoc_plugind.config.settings import Settings
    from aisoc_plugind.engine.hosts import LoadRequest
    from aisoc_plugind.engine.hosts.process import ProcessHost

    settings = Settings(
        plugins_dir=tmp / "plugins",
        state_dir=tmp / "state",
        isolation_group="plugin",
        environment="development",
    )
    events: list[dict[str, Any]] = []
    host = ProcessHost(settings, lambda name, **fields: events.append({"event": name, **fields}))
    starts: list[float] = []
    loaded = []
    try:
        for n in range(hosts + 1):
            root = tmp / "plugins" / f"p{n}"
            request = LoadRequest(
                plugin_id=f"bench.p{n}",
                version="1.0.0",
                root=root,
                sources={"plugin.py": PLUGIN},
                entry_point="plugin.py",
                config={"n": n},
                group=f"signer:bench-{n}",
            )
            started = time.perf_counter()
            loaded.append(await host.load(request))
            starts.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.5)  # idle: let each host settle
        pids = sorted({p.host.pid for p in loaded[1:]})
        uss = [_uss_kib(pid) / 1024 for pid in pids]
        landlock = sorted(
            {str(e.get("landlock")) for e in events if e["event"] == "plugin.host.started"}
        )
    finally:
        await host.aclose()
    return {
        "zygote_and_first_host_ms": starts[0],
        "host_start_ms": statistics.median(starts[1:]),
        "host_start_p90_ms": statistics.quantiles(starts[1:], n=10)[-1],
        "uss_mib": statistics.median(uss),
        "uss_max_mib": max(uss),
        "landlock": landlock,
        "hosts": len(pids),
    }


def child(hosts: int) -> int:
    """`--child N`: one round in this fresh interpreter; JSON on stdout."""
    with tempfile.TemporaryDirectory(prefix="aisoc-host-bench-") as tmp:
        for sub in ("plugins", "state"):
            (Path(tmp) / sub).mkdir()
        print(json.dumps(asyncio.run(_round(hosts, Path(tmp)))))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    rows = []
    for _ in range(args.rounds):
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(args.hosts)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(done.stdout))
    table = _table(rows, args.hosts)
    print(table.split("\n", 1)[1].rsplit("\n", 1)[0])
    if not args.no_docs:
        replace_section(table, BEGIN, END)
    return 0


def _table(rows: list[dict[str, Any]], hosts: int) -> str:
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    lines = [
        BEGIN,
        "## Plugin host start and idle memory (process isolation)",
        "",
        f'{hosts} hosts per round, one small plugin each (`isolation.group = "plugin"`), '
        f"Landlock: {', '.join(rows[0]['landlock'])}. Each round in a fresh interpreter.",
        "See bench/host_start.py.",
        "",
        f"Command: `.venv/bin/python bench/host_start.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"Date: {today}; machine: {os.cpu_count()} CPUs ({platform.machine()}), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}.",
        "",
        "| round | host start, median (ms) | p90 (ms) | zygote + first host (ms) "
        "| idle USS, median (MiB) | max (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['host_start_ms']:.2f} | {r['host_start_p90_ms']:.2f} "
            f"| {r['zygote_and_first_host_ms']:.1f} | {r['uss_mib']:.2f} | {r['uss_max_mib']:.2f} |"
        )
    med = {k: statistics.median(r[k] for r in rows) for k in ("host_start_ms", "uss_mib")}
    lines.append(
        f"| **median** | **{med['host_start_ms']:.2f}** | | | **{med['uss_mib']:.2f}** | |"
    )
    lines += [
        "",
        f"Targets: host start <= 10 ms ({'met' if med['host_start_ms'] <= 10 else 'NOT met'}), "
        f"idle USS <= 12 MiB ({'met' if med['uss_mib'] <= 12 else 'NOT met'}).",
        END,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
