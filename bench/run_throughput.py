"""Measure POST /run throughput and latency against a real daemon process on loopback.

The daemon runs as its own process (`python -m daemon run`) with the default settings that
matter here (strict trust, audit file with fsync=mutations, so one unsynced audit line per
run); this process drives a bounded load with aiohttp: a fixed number of requests at a fixed
concurrency, with a hard deadline. Only 127.0.0.1 is ever contacted. Results go to stdout and
to the run-throughput section of docs/benchmarks.md.

    .venv/bin/python bench/run_throughput.py [--requests 4000] [--concurrency 8] [--no-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import aiohttp
import nacl.signing
from benchdoc import replace_section

from aisoc_plugind.api.tokens import PERMISSIONS
from aisoc_plugind.core import manifest, signing
from aisoc_plugind.engine.bundle import read_bundle

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- run_throughput:begin -->", "<!-- run_throughput:end -->"
DEADLINE_S = 120.0
PLUGINS = {
    "bench.async": "class Plugin:\n    async def run(self, payload, context):\n"
    "        return {'n': payload.get('n', 0) + 1}\n",
    "bench.sync": "class Plugin:\n    def run(self, payload, context):\n"
    "        return {'n': payload.get('n', 0) + 1}\n",
}


def write_plugin(root: Path, plugin_id: str, code: str, key: nacl.signing.SigningKey) -> None:
    """Write and sign one plugin directory."""
    path = root / plugin_id
    path.mkdir(parents=True)
    (path / "plugin.yaml").write_text(
        json.dumps(
            {"id": plugin_id, "name": plugin_id, "version": "1.0.0", "plugin_type": "enricher"}
        )
    )
    (path / "plugin.py").write_text(code)
    bundle = read_bundle(path)
    parsed = manifest.parse(bundle.manifest_bytes, bundle.manifest_name)
    digest = signing.plugin_digest(parsed.as_json(), bundle.sources)
    (path / "plugin.sig").write_bytes(signing.encode_signature(signing.sign_digest(digest, key)))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare(tmp: Path) -> tuple[Path, int]:
    """Create keys, plugins and config; return (config path, port)."""
    key = nacl.signing.SigningKey.generate()
    (tmp / "keys").mkdir()
    (tmp / "keys" / "bench.pem").write_bytes(signing.public_key_pem(key.verify_key))
    for plugin_id, code in PLUGINS.items():
        write_plugin(tmp / "plugins", plugin_id, code, key)
    port = free_port()
    config = tmp / "config.toml"
    config.write_text(
        f'environment = "development"\n[plugins]\ndir = "{tmp}/plugins"\nwatch = false\n'
        f'[trust]\nkeys_dir = "{tmp}/keys"\n[audit]\npath = "{tmp}/audit.jsonl"\n'
        f'[isolation]\nstate_dir = "{tmp}/state"\n'
        f'[api]\nlisten = "127.0.0.1:{port}"\ntokens_file = "{tmp}/tokens.toml"\n'
    )
    return config, port


def create_token(tmp: Path) -> str:
    """Create an all-permissions token with the real CLI."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "aisoc_plugind",
            "token",
            "create",
            "--tokens-file",
            str(tmp / "tokens.toml"),
            "--name",
            "bench",
            "--permissions",
            ",".join(PERMISSIONS),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


async def wait_ready(session: aiohttp.ClientSession, base: str) -> None:
    """Poll /healthz until the daemon answers 200 (bounded)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{base}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("daemon did not become ready")


@dataclass
class Result:
    """Latencies (ms) of one load run."""

    plugin_id: str
    latencies: list[float]
    errors: int
    seconds: float

    def q(self, n: int) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[n - 1]


async def load(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    requests: int,
    concurrency: int,
) -> tuple[list[float], int]:
    """Send `requests` POSTs with `concurrency` workers; return latencies and error count."""
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(requests))

    async def worker() -> None:
        nonlocal errors
        for n in remaining:
            started = time.perf_counter()
            async with session.post(url, json={"payload": {"n": n}}, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), DEADLINE_S)
    return latencies, errors


async def measure(port: int, token: str, requests: int, concurrency: int) -> list[Result]:
    """Warm up, then load each plugin in turn."""
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        await wait_ready(session, base)
        results = []
        for plugin_id in PLUGINS:
            url = f"{base}/api/v1/plugins/{plugin_id}/run"
            await load(session, url, headers, min(200, requests), concurrency)  # warm-up
            started = time.perf_counter()
            latencies, errors = await load(session, url, headers, requests, concurrency)
            results.append(
                Result(
                    plugin_id=plugin_id,
                    latencies=latencies,
                    errors=errors,
                    seconds=time.perf_counter() - started,
                )
            )
        return results


def render(results: list[Result], requests: int, concurrency: int, argv: list[str]) -> str:
    """Return the markdown section for docs/benchmarks.md."""
    rows = [
        f"| `{r.plugin_id}` | {len(r.latencies)} | {r.errors} | "
        f"{len(r.latencies) / r.seconds:,.0f} | {r.q(50):.2f} | {r.q(90):.2f} | "
        f"{r.q(99):.2f} | {max(r.latencies):.2f} |"
        for r in results
    ]
    return "\n".join(
        [
            BEGIN,
            "## Control API: POST /run throughput and latency",
            "",
            "A real daemon process on 127.0.0.1 (strict trust, default `audit.fsync = "
            '"mutations"`: one audit line per run, written but not fsync\'ed), driven by aiohttp '
            f"from a second process: {requests} requests per plugin at concurrency "
            f"{concurrency}, after a warm-up. Per request: token check (one SHA-256 and a dict "
            "lookup), the plugin call (async on the loop, sync in a worker thread), one audit "
            "line and one stdout line.",
            "",
            "Command: `" + " ".join([".venv/bin/python bench/run_throughput.py", *argv]) + "`  ",
            f"Date: {date.today().isoformat()}; machine: {os.cpu_count()} CPUs "
            f"({platform.machine()}), Python {platform.python_version()}. Client and daemon "
            "share the machine's two cores.",
            "",
            "| plugin | requests | errors | req/s | p50 ms | p90 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            END,
        ]
    )


def update_doc(section: str) -> None:
    """Replace the run-throughput section of docs/benchmarks.md (other sections are kept)."""
    replace_section(section, BEGIN, END)


def run_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start the daemon; its stdout (one event per line) goes to a file, not a pipe."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "aisoc_plugind", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aisoc-bench-") as tmp_name:
        tmp = Path(tmp_name)
        config, port = prepare(tmp)
        token = create_token(tmp)
        proc = run_daemon(config, tmp / "daemon.log")
        try:
            results = asyncio.run(measure(port, token, args.requests, args.concurrency))
        finally:
            proc.send_signal(signal.SIGTERM)  # only the process this script started
            proc.wait(timeout=30)
    section = render(results, args.requests, args.concurrency, sys.argv[1:])
    print(section)
    if not args.no_docs:
        update_doc(section)
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
