"""End to end: each plugin type goes new -> keygen -> sign, and the daemon runs it verified."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.audit.log import EventLog, LogOptions
from aisoc_plugind.authoring import scaffold
from aisoc_plugind.cli.main import run_aisoc
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.core.manifest import PLUGIN_TYPES
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.service.wiring import make_manager

# Long end-to-end scenarios: the main test run has them; the interpreter and
# dependency-floor runs of scripts/test.sh skip them (-m 'not slow').
pytestmark = pytest.mark.slow

TYPES = sorted(PLUGIN_TYPES)


@dataclass(frozen=True, slots=True, kw_only=True)
class Authored:
    """A plugin an author generated and signed, and a daemon keys dir trusting the author."""

    plugins_dir: Path
    plugin_dir: Path
    private_key: Path
    keys_dir: Path
    plugin_id: str


def author_plugin(tmp_path: Path, plugin_type: str) -> Authored:
    """Run `new`, `keygen` and `sign` as an author would; trust the key as `author`."""
    plugins_dir = tmp_path / "plugins"
    plugin_dir = plugins_dir / f"my-{plugin_type}"
    private_key = tmp_path / "author-keys" / "signing.key"
    assert (
        run_aisoc(
            ["plugin", "new", f"My {plugin_type}", "--type", plugin_type, "-o", str(plugin_dir)]
        )
        == 0
    )
    assert run_aisoc(["plugin", "keygen", "--out", str(private_key.parent)]) == 0
    assert (
        run_aisoc(
            ["plugin", "sign", "--plugin-dir", str(plugin_dir), "--private-key", str(private_key)]
        )
        == 0
    )
    keys_dir = tmp_path / "trusted"
    keys_dir.mkdir()
    shutil.copyfile(private_key.parent / "signing.pub", keys_dir / "author.pem")
    return Authored(
        plugins_dir=plugins_dir,
        plugin_dir=plugin_dir,
        private_key=private_key,
        keys_dir=keys_dir,
        plugin_id=f"my-{plugin_type}",
    )


@asynccontextmanager
async def strict_daemon(
    authored: Authored, plugin_config: Mapping[str, Mapping[str, Any]] | None = None
) -> AsyncIterator[PluginManager]:
    """Start the daemon's plugin manager in strict mode over the author's plugins dir."""
    settings = Settings(
        plugins_dir=authored.plugins_dir,
        keys_dir=authored.keys_dir,
        trust_mode=TrustMode.STRICT,
        watch=False,
        plugin_config=dict(plugin_config or {}),
    )
    audit = authored.plugins_dir.parent / "audit.jsonl"
    events = EventLog(LogOptions(path=audit), stream=io.StringIO())
    try:
        async with make_manager(settings, events, load_keyring(authored.keys_dir)) as manager:
            await manager.discover()
            yield manager
    finally:
        events.close()


def run_generated_tests(plugin_dir: Path, *, bytecode: bool) -> subprocess.CompletedProcess[str]:
    """Run pytest in the plugin directory as the author would (no pytest-asyncio needed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:asyncio", "-W", "error"],
        cwd=plugin_dir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


@pytest.mark.parametrize("plugin_type", TYPES)
async def test_generated_plugin_runs_verified_in_strict_mode(
    plugin_type: str, tmp_path: Path
) -> None:
    """The daemon loads the signed scaffold `verified` and `run` returns the template's result."""
    authored = author_plugin(tmp_path, plugin_type)
    template = scaffold.template(plugin_type)
    async with strict_daemon(authored) as manager:
        record = manager.get(authored.plugin_id)
        assert (record.state.value, record.signature_status, record.signing_key_id) == (
            "enabled",
            "verified",
            "author",
        ), record.error
        outcome = await manager.run(authored.plugin_id, dict(template.example_payload), {})
    assert outcome.result == template.example_result


async def test_daemon_passes_plugin_config_to_the_generated_plugin(tmp_path: Path) -> None:
    """`[plugin_config."<id>"]` reaches the generated Plugin(config)."""
    authored = author_plugin(tmp_path, "action")
    config = {authored.plugin_id: {"queue": "IR"}}
    async with strict_daemon(authored, plugin_config=config) as manager:
        outcome = await manager.run(authored.plugin_id, {"title": "t"}, {})
    assert outcome.result["ticket"]["queue"] == "IR"


async def test_generated_plugin_changed_after_signing_is_refused(tmp_path: Path) -> None:
    """Editing plugin.py after `sign` makes a strict daemon refuse the plugin as invalid."""
    authored = author_plugin(tmp_path, "enricher")
    with (authored.plugin_dir / "plugin.py").open("a") as fh:
        fh.write("\nTAMPERED = True\n")
    async with strict_daemon(authored) as manager:
        record = manager.get(authored.plugin_id)
    assert (record.state.value, record.signature_status) == ("failed", "invalid")


@pytest.mark.parametrize("plugin_type", TYPES)
def test_generated_tests_pass(plugin_type: str, tmp_path: Path) -> None:
    """The generated test module passes under pytest, run in the plugin directory."""
    plugin_dir = tmp_path / "p"
    assert (
        run_aisoc(
            ["plugin", "new", f"Sample {plugin_type}", "--type", plugin_type, "-o", str(plugin_dir)]
        )
        == 0
    )
    result = run_generated_tests(plugin_dir, bytecode=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout


@pytest.mark.parametrize("plugin_type", TYPES)
def test_generated_plugin_validates_without_warnings(
    plugin_type: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate` accepts every generated plugin with no error and no warning."""
    plugin_dir = tmp_path / "p"
    assert (
        run_aisoc(
            ["plugin", "new", f"Sample {plugin_type}", "--type", plugin_type, "-o", str(plugin_dir)]
        )
        == 0
    )
    assert run_aisoc(["plugin", "validate", str(plugin_dir)]) == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out


def test_running_the_generated_tests_keeps_the_signature_valid(tmp_path: Path) -> None:
    """Caches left by running the tests neither break `validate` nor the signature."""
    authored = author_plugin(tmp_path, "connector")
    result = run_generated_tests(authored.plugin_dir, bytecode=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (authored.plugin_dir / "__pycache__").is_dir()
    assert run_aisoc(["plugin", "validate", str(authored.plugin_dir)]) == 0
    assert (
        run_aisoc(
            [
                "plugin",
                "verify",
                "--plugin-dir",
                str(authored.plugin_dir),
                "--keys-dir",
                str(authored.keys_dir),
            ]
        )
        == 0
    )
