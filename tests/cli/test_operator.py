"""`aisoc plugins ...` against a live API: tables, JSON, errors and exit codes."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from aisoc_plugind.cli.main import run_aisoc
from aisoc_plugind.cli.operator import render_list
from tests.api_fixtures import ECHO_ID, Api, running_component, serve_api
from tests.conftest import Env, PluginFactory


@pytest.fixture
async def api(env: Env, plugins: PluginFactory) -> AsyncIterator[Api]:
    async with serve_api(env, plugins) as live:
        yield live


@pytest.fixture
def as_root(api: Api, monkeypatch: pytest.MonkeyPatch) -> Api:
    """Point the client at the live API with the all-permissions token, via the env."""
    monkeypatch.setenv("AISOC_API", api.url)
    monkeypatch.setenv("AISOC_TOKEN", api.tokens["root"])
    return api


async def aisoc(*argv: str) -> int:
    """Run the client in a worker thread (it blocks) while the server serves."""
    return await anyio.to_thread.run_sync(functools.partial(run_aisoc, ["plugins", *argv]))


async def test_list_prints_a_table(as_root: Api, capsys: pytest.CaptureFixture[str]) -> None:
    """`list` prints one row per plugin with state and signature."""
    assert await aisoc("list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "VERSION", "TYPE", "STATE", "SIGNATURE", "KEY", "ERROR"]
    echo = next(line for line in lines if line.startswith(ECHO_ID)).split()
    assert echo == [ECHO_ID, "1.0.0", "enricher", "enabled", "verified", "vector-signer", "-"]
    assert any("signature_unsigned" in line for line in lines)


async def test_list_json_and_filters(as_root: Api, capsys: pytest.CaptureFixture[str]) -> None:
    """`--json` prints the API body; --type and --state filter (options go anywhere)."""
    assert await aisoc("--json", "list", "--type", "connector") == 0
    body = json.loads(capsys.readouterr().out)
    assert [p["id"] for p in body["plugins"]] == ["example.legacy-connector"]
    assert await aisoc("list", "--state", "failed", "--json") == 0
    assert [p["id"] for p in json.loads(capsys.readouterr().out)["plugins"]] == ["test.unsigned"]


async def test_show(as_root: Api, capsys: pytest.CaptureFixture[str]) -> None:
    """`show ID` prints the record as key: value lines."""
    assert await aisoc("show", ECHO_ID) == 0
    out = capsys.readouterr().out
    assert "state:" in out
    assert "enabled" in out
    assert "signing_key_id:" in out


async def test_lifecycle_commands(
    as_root: Api, capsys: pytest.CaptureFixture[str], plugins: PluginFactory
) -> None:
    """disable, enable, reload, discover and unload act on the daemon."""
    assert await aisoc("disable", ECHO_ID) == 0
    assert capsys.readouterr().out.strip() == f"{ECHO_ID} 1.0.0: disabled"
    assert await aisoc("enable", ECHO_ID) == 0
    plugins.write("echo", version="1.1.0")
    assert await aisoc("reload", ECHO_ID) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{ECHO_ID} 1.1.0: enabled"
    plugins.write("late")
    assert await aisoc("discover") == 0
    assert "discovered: test.late" in capsys.readouterr().out
    assert await aisoc("unload", ECHO_ID) == 0
    assert as_root.manager.get(ECHO_ID).state.value == "unloaded"


async def test_run_prints_the_result(as_root: Api, capsys: pytest.CaptureFixture[str]) -> None:
    """`run ID --payload JSON --context JSON` prints the plugin's result."""
    assert (
        await aisoc(
            "run", "example.geoip-enricher", "--payload", '{"ip": "1.1.1.1"}', "--context", "{}"
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == {"ip": "1.1.1.1", "country": "AU"}
    assert await aisoc("run", "example.legacy-connector", "--json") == 0
    body = json.loads(capsys.readouterr().out)
    assert body["plugin_id"] == "example.legacy-connector"
    assert "duration_ms" in body


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "test.nothing"], "no plugin with id 'test.nothing'"),
        (["run", "test.boom"], "plugin raised RuntimeError"),  # the type only, never the text
        (["enable", "test.unsigned"], "is failed"),
    ],
)
async def test_server_errors_exit_1_with_the_message(
    as_root: Api, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed operation exits 1 and prints the server's error.message on stderr."""
    assert await aisoc(*argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


async def test_missing_token_hints_at_aisoc_token(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a token: exit 1, the server's message, and a hint."""
    monkeypatch.delenv("AISOC_TOKEN", raising=False)
    assert await aisoc("--api", api.url, "list") == 1
    assert "set AISOC_TOKEN" in capsys.readouterr().err


async def test_token_option_and_permission_errors(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--token overrides the environment; a read token cannot disable (exit 1, 403 text)."""
    monkeypatch.setenv("AISOC_TOKEN", "aisoc_pd_wrong")
    argv = ["--api", api.url, "--token", api.tokens["reader"]]
    assert await aisoc(*argv, "list") == 0
    assert await aisoc(*argv, "disable", ECHO_ID) == 1
    assert "lacks the permission plugins:admin" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["show"],
        ["run", ECHO_ID, "--payload", "{bad"],
        ["run", ECHO_ID, "--payload", "[1]"],
        ["--api", "ftp://x", "list"],
    ],
)
async def test_usage_errors_exit_2(
    as_root: Api, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad command lines and bad --payload JSON are usage errors."""
    assert await aisoc(*argv) == 2
    assert capsys.readouterr().out == ""


async def test_unreachable_api_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening: exit 1 with 'cannot reach'."""
    assert await aisoc("--api", "http://127.0.0.1:9", "list") == 1
    assert "cannot reach the API" in capsys.readouterr().err


async def test_install_reports_the_server_answer(
    as_root: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    """`install REF` posts the reference; a failure is exit 1 with the server's message."""
    assert await aisoc("install", "127.0.0.1:9/plugins/none:1.0.0") == 1
    assert capsys.readouterr().err.startswith("aisoc plugins: error: ")


def test_empty_list_renders_a_sentence() -> None:
    """No plugins is said in words, not an empty table."""
    assert render_list({"plugins": []}) == "no plugins"


async def test_unix_socket_address(
    env: Env,
    plugins: PluginFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """AISOC_API=unix:/path.sock talks to a daemon listening on a unix socket."""
    sock = tmp_path / "api.sock"
    async with running_component(env, plugins, f"unix:{sock}") as daemon:
        monkeypatch.setenv("AISOC_API", f"unix:{sock}")
        monkeypatch.setenv("AISOC_TOKEN", daemon.tokens["reader"])
        assert await aisoc("show", "example.legacy-connector") == 0
    assert "example.legacy-connector" in capsys.readouterr().out
