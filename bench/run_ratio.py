"""POST /run with auth, audit line and metrics, against a bare aiohttp JSON handler, same run.

    .venv/bin/python bench/run_ratio.py [--isolation process|none] [--seconds 10]
        [--slice 2] [--connections 32] [--rounds 3] [--no-docs]

Two servers run as their own processes on 127.0.0.1, one event loop each:

- ours: `python -m aisoc_plugind run` (`--isolation process`, the default: the plugin runs
  in a sandboxed host process, each run a round trip over its socket; `none`: in the daemon),
  strict trust, audit file with the default fsync policy (a run is answered once its
  `plugin.run.completed` line is written),
  serving an async plugin shaped like the example enricher; every request carries a bearer
  token and is checked, counted in /metrics and written to the audit file.
- bare: an aiohttp application with one POST route that parses the JSON body and answers
  a JSON object (`request.json()` and `web.json_response()`), nothing else.

wrk (Debian package `wrk`) drives each for `--seconds` per round with `--connections`
keep-alive connections and one thread, in alternating slices of `--slice` seconds (this VM's
speed drifts over seconds: short alternating slices expose both servers to the same drift),
`--rounds` times; a round's figure is the mean over its slices, and the medians of the
rounds are compared. Only
127.0.0.1 is contacted; both servers are stopped by their PIDs. Results go to stdout and to
the run-ratio section of docs/benchmarks.md for that isolation mode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
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
# The target per isolation mode: in the daemon (audit pipeline issue), through a host process
# (isolation issue).
TARGETS = {"none": (0.8, "audit pipeline"), "process": (0.5, "isolation")}


PLUGIN_ID = "bench.enricher"
PLUGIN = """SAMPLE = {
    "1.1.1.1": {"ports": [53, 80, 443], "tags": ["dns", "cdn"], "org": "Cloudflare"},
}


class Plugin:
    def __init__(self, config):
        self.default_tags = list(config.get("default_tags", []))

    async def run(self, payload, context):
        ip = str(payload.get("ip", ""))
        hit = SAMPLE.get(ip)
        if hit is None:
            return {"ip": ip, "found": False, "tags": self.default_tags}
        return {"ip": ip, "found": True, **hit, "tags": hit["tags"] + self.default_tags}
"""
BARE = """
import sys
from aiohttp import web

async def run(request):
    body = await request.json()
    ip = str(body.get("payload", {}).get("ip", ""))
    return web.json_response({"plugin_id": request.match_info["id"], "result": {"ip": ip}})

app = web.Application()
app.router.add_post("/api/v1/plugins/{id}/run", run)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""
LUA = """
wrk.method = "POST"
wrk.body = '{"payload": {"ip": "1.1.1.1"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare(tmp: Path, isolation: str) -> tuple[Path, int, str]:
    """Write a signed plugin, keys, config and a token; return (config, port, token)."""
    from aisoc_plugind.api.tokens import PERMISSIONS
    from aisoc_plugind.core import manifest, signing

    key = nacl.signing.SigningKey.generate()
    (tmp / "keys").mkdir()
    (tmp / "keys" / "bench.pem").write_bytes(signing.public_key_pem(key.verify_key))
    plugin = tmp / "plugins" / "enricher"
    plugin.mkdir(parents=True)
    text = f"id: {PLUGIN_ID}\nname: Bench enricher\nversion: 1.0.0\nplugin_type: enricher\n"
    digest = signing.plugin_digest(
        manifest.parse(text.encode()).plain, {"plugin.py": PLUGIN.encode()}
    )
    (plugin / "plugin.py").write_text(PLUGIN)
    (plugin / "plugin.yaml").write_text(text)
    (plugin / "plugin.sig").write_bytes(signing.encode_signature(signing.sign_digest(digest, key)))
    port = free_port()
    config = tmp / "config.toml"
    config.write_text(
        f'environment = "development"\n[plugins]\ndir = "{tmp}/plugins"\nwatch = false\n'
        f'[trust]\nkeys_dir = "{tmp}/keys"\n[audit]\npath = "{tmp}/audit.jsonl"\n'
        f'[isolation]\nstate_dir = "{tmp}/state"\nmode = "{isolation}"\n'
        f'[api]\nlisten = "127.0.0.1:{port}"\ntokens_file = "{tmp}/tokens.toml"\n'
    )
    made = subprocess.run(
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
    return config, port, made.stdout.strip()


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("server did not listen in 30 s")


def wrk(url: str, lua: Path, seconds: int, connections: int, token: str) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(lua), url],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "BENCH_TOKEN": token},
    ).stdout
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)

    def ms(label: str) -> float:
        found = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not found:
            return float("nan")
        value, unit = float(found.group(1)), found.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
        "p50": ms("50"),
        "p99": ms("99"),
    }


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _round(
    i: int, args: argparse.Namespace, lua: Path, token: str, urls: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """One round: `args.seconds` per server in alternating slices; the mean req/s, the
    median p50 and p99 over the slices, the non-2xx answers summed."""
    step = max(1, min(args.slice, args.seconds))
    slices: dict[str, list[dict[str, Any]]] = {"ours": [], "bare": []}
    order = ["ours", "bare"]
    for n in range(max(1, args.seconds // step)):
        for who in order if (i + n) % 2 == 0 else order[::-1]:
            slices[who].append(wrk(urls[who], lua, step, args.connections, token))
    return {
        who: {
            "rps": statistics.fmean(s["rps"] for s in runs),
            "non_2xx": sum(s["non_2xx"] for s in runs),
            "p50": statistics.median(s["p50"] for s in runs),
            "p99": statistics.median(s["p99"] for s in runs),
        }
        for who, runs in slices.items()
    }


def render(rounds: list[dict[str, Any]], args: argparse.Namespace, audit_lines: int) -> str:
    ours = statistics.median(r["ours"]["rps"] for r in rounds)
    bare = statistics.median(r["bare"]["rps"] for r in rounds)
    # Each round's ratio compares the two servers under the same conditions: the median of
    # those, not the ratio of medians taken from different rounds.
    ratio = statistics.median(r["ours"]["rps"] / r["bare"]["rps"] for r in rounds)
    target, _ = TARGETS[args.isolation]
    begin, end = markers("run_ratio", args.isolation)
    mode = "in-process mode" if args.isolation == "none" else "through a plugin host process"
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    rows = []
    for i, r in enumerate(rounds):
        o, b = r["ours"], r["bare"]
        rows.append(
            f"| {i + 1} | {o['rps']:,.0f} | {b['rps']:,.0f} | {o['rps'] / b['rps']:.2f} | "
            f"{o['p50']:.2f} / {o['p99']:.2f} | {b['p50']:.2f} / {b['p99']:.2f} |"
        )
    return "\n".join(
        [
            begin,
            f"## POST /run against a bare aiohttp JSON handler ({mode})",
            "",
            "Ours: a real daemon process, bearer token checked, the run's audit line written",
            "before the answer, metrics counted, an async plugin shaped like the example",
            "enricher. Bare: one aiohttp route that parses the JSON body and answers JSON.",
            f"wrk, {args.connections} keep-alive connections, one thread, {args.seconds} s per",
            f"server per round in alternating {args.slice} s slices (p50 / p99: median over",
            "the slices). See bench/run_ratio.py.",
            "",
            f"Command: `.venv/bin/python bench/run_ratio.py {' '.join(sys.argv[1:])}`".rstrip(),
            f"Date: {today}; machine: {os.cpu_count()} CPUs ({platform.machine()}), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}.",
            "",
            "| round | ours req/s | bare req/s | ratio | ours p50 / p99 ms | bare p50 / p99 ms |",
            "|---:|---:|---:|---:|---:|---:|",
            *rows,
            f"| **median** | **{ours:,.0f}** | **{bare:,.0f}** | **{ratio:.2f}** | | |",
            "",
            f"Every answer was 2xx; the daemon wrote {audit_lines:,} audit lines.",
            f"Target: at least {target} times the bare handler: "
            f"{'met' if ratio >= target else 'NOT met'}.",
            end,
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--slice", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--isolation", choices=sorted(TARGETS), default="process")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="aisoc-run-ratio-") as name:
        tmp = Path(name)
        config, port, token = prepare(tmp, args.isolation)
        bare_port = free_port()
        lua = tmp / "post.lua"
        lua.write_text(LUA)
        ours = subprocess.Popen(
            [sys.executable, "-m", "aisoc_plugind", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        bare = subprocess.Popen([sys.executable, "-c", BARE, str(bare_port)])
        rounds = []
        try:
            wait_listening(port, ours)
            wait_listening(bare_port, bare)
            ours_url = f"http://127.0.0.1:{port}/api/v1/plugins/{PLUGIN_ID}/run"
            bare_url = f"http://127.0.0.1:{bare_port}/api/v1/plugins/{PLUGIN_ID}/run"
            wrk(ours_url, lua, 2, args.connections, token)  # warm up both
            wrk(bare_url, lua, 2, args.connections, token)
            for i in range(args.rounds):
                result = _round(i, args, lua, token, {"ours": ours_url, "bare": bare_url})
                if result["ours"]["non_2xx"] or result["bare"]["non_2xx"]:
                    print(f"error: non-2xx answers: {json.dumps(result)}", file=sys.stderr)
                    return 1
                rounds.append(result)
                print(
                    f"round {i + 1}: ours {result['ours']['rps']:,.0f} req/s, "
                    f"bare {result['bare']['rps']:,.0f} req/s"
                )
        finally:
            stop(ours)
            stop(bare)
        audit_lines = sum(1 for _ in (tmp / "audit.jsonl").open("rb"))
    section = render(rounds, args, audit_lines)
    print(section.split("\n", 1)[1].rsplit("\n", 1)[0])
    if not args.no_docs:
        replace_section(section, *markers("run_ratio", args.isolation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
