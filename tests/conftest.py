"""Shared fixtures: the signature vectors, real signed plugin directories, a live manager."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.audit.log import EventLog, LogOptions
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.core import manifest as manifest_mod
from aisoc_plugind.core.signing import (
    TrustMode,
    encode_signature,
    load_private_key,
    plugin_digest,
    sign_digest,
)
from aisoc_plugind.engine.bundle import read_bundle
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.service.wiring import make_manager as wire_manager

# Every native event the suite writes is checked against docs/events.schema.json.
pytest_plugins = ["tests.eventcheck"]

# The project's own copy of the signature vectors (INTERFACE §4): a clone runs its tests with
# nothing beside it. tests/test_vectors_copy.py checks the copy against the format.
REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "tests" / "vectors"
VECTOR_KEY = VECTORS / "keys" / "vector-signer.key"
VECTOR_PUB = VECTORS / "keys" / "vector-signer.pem"
UNTRUSTED_PUB = VECTORS / "untrusted-signer.pem"


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy a read-only tree (the vectors) and make the copy writable."""
    shutil.copytree(src, dst)
    for root, dirs, files in os.walk(dst):
        for name in dirs + files:
            p = Path(root) / name
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    dst.chmod(0o755)
    return dst


def sign_dir(path: Path, key_file: Path = VECTOR_KEY) -> bytes:
    """Sign a plugin directory in place with a PKCS#8 key file; return the plugin.sig bytes."""
    bundle = read_bundle(path)
    parsed = manifest_mod.parse(bundle.manifest_bytes, bundle.manifest_name)
    digest = plugin_digest(parsed.as_json(), bundle.sources)
    sig = encode_signature(sign_digest(digest, load_private_key(key_file.read_bytes())))
    (path / "plugin.sig").write_bytes(sig)
    return sig


SIMPLE_CODE = """
class Plugin:
    def run(self, payload, context):
        return {"version": VERSION, "echo": payload}
"""


@dataclass
class PluginFactory:
    """Write plugin directories under `root` (the plugins dir)."""

    root: Path

    def write(
        self,
        dirname: str,
        *,
        plugin_id: str | None = None,
        version: str = "1.0.0",
        code: str | None = None,
        files: dict[str, str] | None = None,
        manifest_extra: dict[str, Any] | None = None,
        sign: bool = True,
        key_file: Path = VECTOR_KEY,
    ) -> Path:
        path = self.root / dirname
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "id": plugin_id or f"test.{dirname}",
            "name": dirname.title(),
            "version": version,
            "plugin_type": "enricher",
            **(manifest_extra or {}),
        }
        (path / "plugin.yaml").write_text(json.dumps(manifest))  # JSON is valid YAML
        body = code if code is not None else f"VERSION = {version!r}\n" + SIMPLE_CODE
        (path / "plugin.py").write_text(textwrap.dedent(body))
        for rel, text in (files or {}).items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_text(textwrap.dedent(text))
        (path / "plugin.sig").unlink(missing_ok=True)
        if sign:
            sign_dir(path, key_file)
        return path


@dataclass
class Env:
    """A plugins dir, a keys dir holding the vector key, and an audit file in tmp_path."""

    tmp: Path
    plugins: Path
    keys: Path
    audit: Path
    stdout: io.StringIO = field(default_factory=io.StringIO)
    logs: list[EventLog] = field(default_factory=list)

    def settings(self, **overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "plugins_dir": self.plugins,
            "keys_dir": self.keys,
            "audit_path": self.audit,
            "tokens_file": self.tmp / "tokens.toml",
            "run_timeout_s": 2.0,
            "shutdown_grace_s": 2.0,
            "state_dir": self.tmp / "state",
            "revoked_file": self.tmp / "revoked.toml",
            "watch": False,
            "environment": "development",
        }
        base.update(overrides)
        return Settings(**base)

    def events(self, **options: Any) -> EventLog:
        """Return an event log writing the audit file (closed when the test ends)."""
        log = EventLog(LogOptions(path=self.audit, **options), stream=self.stdout)
        self.logs.append(log)
        return log

    def flush(self) -> None:
        """Wait until every event emitted so far is in the audit file."""
        for log in self.logs:
            log.flush()

    def close(self) -> None:
        """Stop every event log of the test."""
        for log in self.logs:
            log.close()

    def audit_text(self) -> str:
        """Return the audit file's text once every event emitted so far is in it."""
        self.flush()
        return self.audit.read_text() if self.audit.exists() else ""

    def audit_events(self) -> list[dict[str, Any]]:
        self.flush()
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def names(self) -> list[str]:
        return [e["event"] for e in self.audit_events()]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    plugins = tmp_path / "plugins"
    keys = tmp_path / "keys"
    plugins.mkdir(mode=0o755)
    keys.mkdir(mode=0o755)
    shutil.copy(VECTOR_PUB, keys / "vector-signer.pem")
    made = Env(tmp=tmp_path, plugins=plugins, keys=keys, audit=tmp_path / "log" / "audit.jsonl")
    yield made
    made.close()


@pytest.fixture
def plugins(env: Env) -> PluginFactory:
    return PluginFactory(env.plugins)


ManagerFactory = Callable[..., Any]


@pytest.fixture
async def make_manager(env: Env) -> AsyncIterator[ManagerFactory]:
    """Start managers on `env` (closed at the end of the test); kwargs override settings."""
    opened: list[PluginManager] = []

    async def start(trust_mode: TrustMode = TrustMode.STRICT, **overrides: Any) -> PluginManager:
        settings = env.settings(trust_mode=trust_mode, **overrides)
        manager = wire_manager(settings, env.events(), load_keyring(settings.keys_dir))
        await manager.__aenter__()
        opened.append(manager)
        return manager

    yield start
    for manager in reversed(opened):
        await manager.__aexit__(None, None, None)
