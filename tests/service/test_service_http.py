"""The daemon serving HTTP while it changes: reloads under load, SIGTERM with a run in flight."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import anyio

from tests.api_fixtures import serve_api, write_tokens
from tests.conftest import Env, PluginFactory
from tests.service.test_daemon_process import _events, _wait_for

VERSIONED = """
import asyncio
VERSION = {version!r}
class Plugin:
    async def run(self, payload, context):
        await asyncio.sleep(payload.get("wait", 0))
        return {{"version": VERSION}}
"""


async def test_fifty_reloads_while_clients_call_run(env: Env, plugins: PluginFactory) -> None:
    """50 HTTP reloads while 6 clients keep calling /run: zero failed requests."""
    async with serve_api(env, plugins) as api:
        plugins.write("hot", code=VERSIONED.format(version="v0"))
        status, _ = await api.json("POST", "/api/v1/plugins/discover")
        assert status == 200
        seen: list[str] = []
        failures: list[tuple[int, Any]] = []
        done = anyio.Event()

        async def client() -> None:
            while not done.is_set():
                status, body = await api.json(
                    "POST", "/api/v1/plugins/test.hot/run", json={"payload": {"wait": 0.005}}
                )
                if status != 200:
                    failures.append((status, body))
                else:
                    seen.append(body["result"]["version"])

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(client)
            for n in range(1, 51):
                plugins.write("hot", version=f"1.0.{n}", code=VERSIONED.format(version=f"v{n}"))
                status, body = await api.json("POST", "/api/v1/plugins/test.hot/reload")
                assert status == 200, body
                assert body["version"] == f"1.0.{n}"
            done.set()
        assert failures == []
        assert len(seen) > 50
        assert set(seen) <= {f"v{n}" for n in range(51)}
        status, body = await api.json("POST", "/api/v1/plugins/test.hot/run")
        assert (status, body["result"]) == (200, {"version": "v50"})
        assert len(api.events("plugin.reload.completed")) == 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_lets_the_run_in_flight_finish(env: Env, plugins: PluginFactory) -> None:
    """SIGTERM while a run is in flight: it completes (200), exit 0, audit ends daemon.stopped;
    the plugin's teardown ran (in its host: it marks its own state directory)."""
    marker = env.tmp / "state" / "test.slow" / "teardown-called"
    plugins.write(
        "slow",
        code=VERSIONED.format(version="v1")
        + f"    async def teardown(self):\n        open({str(marker)!r}, 'w').close()\n",
    )
    token = write_tokens(env.tmp / "tokens.toml", {"ops": ("plugins:execute",)})["ops"]
    port = _free_port()
    config = env.tmp / "config.toml"
    config.write_text(
        f'environment = "development"\n[plugins]\ndir = "{env.plugins}"\nwatch = false\n'
        f'[trust]\nkeys_dir = "{env.keys}"\n[audit]\npath = "{env.audit}"\n'
        f'[isolation]\nstate_dir = "{env.tmp}/state"\n'
        f'[api]\nlisten = "127.0.0.1:{port}"\ntokens_file = "{env.tmp}/tokens.toml"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "aisoc_plugind", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    answer: dict[str, Any] = {}

    def call() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request(
            "POST",
            "/api/v1/plugins/test.slow/run",
            body=json.dumps({"payload": {"wait": 1.0}}),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            response = conn.getresponse()
            answer.update(status=response.status, body=json.loads(response.read()))
        finally:
            conn.close()

    try:
        _wait_for(env.audit, "daemon.ready")
        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.4)  # the request is being served by now (the plugin sleeps 1 s)
        proc.send_signal(signal.SIGTERM)
        caller.join(timeout=20)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
    assert answer == {
        "status": 200,
        "body": {
            "plugin_id": "test.slow",
            "result": {"version": "v1"},
            "duration_ms": answer["body"]["duration_ms"],
        },
    }
    names = [e["event"] for e in _events(env.audit)]
    assert names[-1] == "daemon.stopped"
    assert names.index("daemon.stopping") < names.index("plugin.run.completed")
    assert marker.exists()
