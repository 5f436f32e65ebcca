"""Run every benchmark and print the figures the issues ask for, as ratios (one command).

    .venv/bin/python bench/all.py [--quick] [--no-docs]

Runs, each as its own process, in this order, for isolation modes `process` (the default)
and `none`: cold discovery against a naive importlib loader (bench/discovery.py), POST /run
against a bare aiohttp handler (bench/run_ratio.py, needs wrk); then plugin host start and
idle memory (bench/host_start.py), hot-reload latency (bench/reload_latency.py) and /run
latency under a bounded load (bench/run_throughput.py). Each refreshes its section of
docs/benchmarks.md unless `--no-docs`; `--quick` makes every run shorter (for a smoke test,
not for the doc).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, args: list[str]) -> str:
    """Run one benchmark script; echo and return its output (a failure stops everything)."""
    print(f"== {script} {' '.join(args)}", flush=True)
    done = subprocess.run(
        [sys.executable, str(HERE / script), *args], capture_output=True, text=True, check=False
    )
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed with exit code {done.returncode}")
    return done.stdout


def median_row(output: str) -> list[str]:
    """Return the cells of the `| **median** |` row of a benchmark's table."""
    for line in output.splitlines():
        if line.startswith("| **median**"):
            return [cell.strip().strip("*") for cell in line.strip("|").split("|")]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    docs = ["--no-docs"] if args.no_docs or args.quick else []
    quick = args.quick
    results: dict[str, tuple[list[str], list[str]]] = {}
    for mode in ("process", "none"):
        discovery = run(
            "discovery.py",
            [*(["--plugins", "200", "--rounds", "1"] if quick else []), "--isolation", mode, *docs],
        )
        ratio = run(
            "run_ratio.py",
            [*(["--seconds", "2", "--rounds", "1"] if quick else []), "--isolation", mode, *docs],
        )
        results[mode] = (median_row(discovery), median_row(ratio))
    hosts = run("host_start.py", [*(["--hosts", "10", "--rounds", "1"] if quick else []), *docs])
    run(
        "reload_latency.py",
        [*(["--iterations", "20", "--idle-seconds", "0.5"] if quick else []), *docs],
    )
    run("run_throughput.py", [*(["--requests", "400"] if quick else []), *docs])
    print("\n== summary (medians)")
    for mode, (d, r) in results.items():
        if d:
            print(
                f"[{mode}] cold discovery: {d[1]} ms per plugin, {d[3]} x the naive importlib "
                "loader (target: <= 0.5 ms and <= 0.5 x)"
            )
        if r:
            target = "0.5" if mode == "process" else "0.8"
            print(
                f"[{mode}] POST /run: {r[1]} req/s, {r[3]} x a bare aiohttp JSON handler "
                f"(target: >= {target} x)"
            )
    h = median_row(hosts)
    if h:
        print(f"host start: {h[1]} ms median, idle USS {h[4]} MiB (targets: <= 10 ms, <= 12 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
