"""Shared helpers of the control-API tests: tokens, test plugins, a live API on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from aisoc_plugind.api.app import HangupHook, build_app
from aisoc_plugind.api.tokens import PERMISSIONS, TokenStore, new_token, token_hash
from aisoc_plugind.api.tokens_file import TokenEntry, write_tokens_file
from aisoc_plugind.audit.names import API_ERROR, API_LISTENING
from aisoc_plugind.core.clock import rfc3339, utcnow
from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.service.components import api_component
from aisoc_plugind.service.daemon import Service
from aisoc_plugind.service.wiring import make_manager
from tests.conftest import VECTORS, Env, PluginFactory, copy_tree

READ, ADMIN, EXECUTE = PERMISSIONS
# Token name -> permissions granted in every test's tokens file.
GRANTS: Mapping[str, tuple[str, ...]] = {
    "reader": (READ,),
    "admin": (ADMIN,),
    "runner": (EXECUTE,),
    "root": PERMISSIONS,
    "revoked": PERMISSIONS,
}
ECHO_ID = "test.echo"
SECRET_MARK = "s3cret-payload-marker-7f3a"

BOOM_CODE = """
class Plugin:
    def run(self, payload, context):
        raise RuntimeError("it broke")
"""
SLEEPY_CODE = """
import anyio
class Plugin:
    async def run(self, payload, context):
        await anyio.sleep(30)
"""
BAD_RESULT_CODE = """
class Plugin:
    def run(self, payload, context):
        return {"not_json": object()}
"""


def write_tokens(path: Path, grants: Mapping[str, tuple[str, ...]] = GRANTS) -> dict[str, str]:
    """Write a tokens file (0600) granting `grants`; return name -> token."""
    tokens = {name: new_token() for name in grants}
    entries = {
        name: TokenEntry(
            name=name, sha256=token_hash(tokens[name]), permissions=perms, created=rfc3339(utcnow())
        )
        for name, perms in grants.items()
    }
    write_tokens_file(path, entries)
    return tokens


def revoke(path: Path, name: str) -> None:
    """Remove one token from the tokens file (as `token revoke` does)."""
    from aisoc_plugind.api.tokens_file import parse_tokens

    entries, problems = parse_tokens(path.read_bytes())
    assert not problems
    del entries[name]
    write_tokens_file(path, entries)


def write_test_plugins(env: Env, plugins: PluginFactory) -> None:
    """Install the vector plugins plus echo, boom, sleepy, bad-result and an unsigned one."""
    for name in ("geoip-enricher", "legacy-connector"):
        copy_tree(VECTORS / "plugins" / name, env.plugins / name)
    plugins.write("echo")
    plugins.write("boom", code=BOOM_CODE)
    plugins.write("sleepy", code=SLEEPY_CODE)
    plugins.write("badresult", code=BAD_RESULT_CODE)
    plugins.write("unsigned", sign=False)  # strict mode: ends `failed`


@dataclass
class Api:
    """A live control API on 127.0.0.1 over a real manager and real plugin directories."""

    env: Env
    client: TestClient[web.Request, web.Application]
    manager: PluginManager
    tokens: dict[str, str]
    tokens_file: Path
    ready: threading.Event = field(default_factory=threading.Event)

    def auth(self, name: str | None) -> dict[str, str]:
        """Return the Authorization header of token `name` (none for None)."""
        return {} if name is None else {"Authorization": f"Bearer {self.tokens[name]}"}

    async def call(
        self, method: str, path: str, token: str | None = "root", **kwargs: Any
    ) -> ClientResponse:
        """Send a request with the named token's header merged into `headers`."""
        headers = {**self.auth(token), **kwargs.pop("headers", {})}
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def json(
        self, method: str, path: str, token: str | None = "root", **kwargs: Any
    ) -> tuple[int, Any]:
        """Send a request; return (status, JSON body or None)."""
        async with await self.call(method, path, token, **kwargs) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None

    def audit_text(self) -> str:
        """Return the audit file as written so far."""
        return self.env.audit_text()

    def events(self, name: str) -> list[dict[str, Any]]:
        """Return the audit events called `name`."""
        return [e for e in self.env.audit_events() if e["event"] == name]

    @property
    def url(self) -> str:
        """Return the server's base URL (http://127.0.0.1:PORT)."""
        return str(self.client.make_url("")).rstrip("/")


@asynccontextmanager
async def serve_api(
    env: Env,
    plugins: PluginFactory,
    *,
    oci: bool = True,
    wrap: Callable[[PluginManager], Any] | None = None,
    trust_mode: TrustMode = TrustMode.STRICT,
    internal_errors_expected: bool = False,
    **overrides: Any,
) -> AsyncIterator[Api]:
    """Start a manager over the test plugins and the API on an ephemeral loopback port.

    On exit, fails the test if the API answered any 500 (an `api.error` event), unless the
    test injects faults on purpose.
    """
    write_test_plugins(env, plugins)
    tokens_file = env.tmp / "tokens.toml"
    tokens = write_tokens(tokens_file)
    revoke(tokens_file, "revoked")
    settings = env.settings(trust_mode=trust_mode, tokens_file=tokens_file, **overrides)
    events = env.events()
    ready = threading.Event()
    ready.set()
    keyring = load_keyring(settings.keys_dir)
    made = (
        make_manager(settings, events, keyring) if oci else PluginManager(settings, events, keyring)
    )  # no OCI fetcher: install_from_oci answers 501
    async with made as manager:
        await manager.discover()
        app = build_app(
            manager=wrap(manager) if wrap else manager,
            events=events,
            tokens=TokenStore(tokens_file),
            settings=settings,
            ready=ready.is_set,
        )
        async with TestServer(app, host="127.0.0.1") as server, TestClient(server) as client:
            api = Api(
                env=env,
                client=client,
                manager=manager,
                tokens=tokens,
                tokens_file=tokens_file,
                ready=ready,
            )
            yield api
    if not internal_errors_expected:
        assert api.events(API_ERROR) == [], "the API answered 500 internal_error"


@dataclass
class Daemon:
    """The API component running inside a (not started) Service, as the daemon wires it."""

    service: Service
    manager: PluginManager
    hangup: HangupHook | None
    tokens: dict[str, str]
    tokens_file: Path

    def address(self) -> str:
        """Return the first address from the `api.listening` event."""
        self.service.events.flush()
        events = [
            json.loads(line) for line in self.service.settings.audit_path.read_text().splitlines()
        ]
        return next(e for e in events if e["event"] == API_LISTENING)["addresses"][0]


@asynccontextmanager
async def running_component(
    env: Env, plugins: PluginFactory, listen: str, **overrides: Any
) -> AsyncIterator[Daemon]:
    """Enter `api_component` for a Service on `listen`; the service is not marked ready."""
    write_test_plugins(env, plugins)
    tokens_file = env.tmp / "tokens.toml"
    tokens = write_tokens(tokens_file)
    settings = env.settings(api_listen=listen, tokens_file=tokens_file, **overrides)
    service = Service(settings, stream=env.stdout)
    env.logs.append(service.events)
    async with make_manager(settings, service.events, load_keyring(settings.keys_dir)) as manager:
        await manager.discover()
        async with api_component(service, manager) as hangup:
            yield Daemon(
                service=service,
                manager=manager,
                hangup=hangup,
                tokens=tokens,
                tokens_file=tokens_file,
            )


@contextmanager
def api_in_thread(env: Env, plugins: PluginFactory, **overrides: Any) -> Iterator[Api]:
    """Run `serve_api` on its own event loop in a thread, for synchronous clients."""
    started, box = threading.Event(), {}

    async def main() -> None:
        stop = asyncio.Event()
        box["stop"] = (asyncio.get_running_loop(), stop)
        try:
            async with serve_api(env, plugins, **overrides) as api:
                box["api"] = api
                started.set()
                await stop.wait()
        finally:
            started.set()

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the test below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    started.wait(30)
    if "api" not in box:
        thread.join(5)
        raise RuntimeError(f"the API did not start: {box.get('error')!r}")
    try:
        yield box["api"]
    finally:
        loop, stop = box["stop"]
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
    if "error" in box:
        raise box["error"]
