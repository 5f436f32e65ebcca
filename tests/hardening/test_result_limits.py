"""Payloads and results past what the protocol allows, with the supervisor in this process.

A manager in process isolation mode runs here (its hosts are real subprocesses), so the
supervisor's checks count for coverage: a payload no host would accept is refused before it
is sent (`payload_too_large`, the host lives), a result over `plugins.max_result_bytes` is
refused whether the host says so or lies (`plugin_result_too_large`, checked before any
decoding), and the in-process host applies the same cap.
"""

from __future__ import annotations

from typing import Any

import pytest

from aisoc_plugind.core.signing import TrustMode
from aisoc_plugind.engine.hosts.protocol import HEADER_CAP, FrameTooLarge, Kind, encode
from aisoc_plugind.errors import PluginResultInvalid, PluginRunError
from tests.conftest import Env, ManagerFactory, PluginFactory

CAP = 50_000
BIG = f"""
class Plugin:
    def run(self, payload, context):
        return {{"x": "a" * {CAP * 2}}}
"""
ASYNC_BIG = f"""
class Plugin:
    async def run(self, payload, context):
        return {{"x": "a" * {CAP * 2}}}
"""
FORGER = f"""
import sys
class Plugin:
    def run(self, payload, context):
        host = sys.modules["aisoc_plugind.engine.hosts.runtime"]._Host
        host.result_bytes = lambda self, value: b'{{"x":"' + b"a" * {CAP * 3} + b'"}}'
        return {{}}
"""
ECHO = """
class Plugin:
    def run(self, payload, context):
        return {"n": len(payload.get("text", ""))}
"""


def test_a_header_over_the_cap_is_refused_when_encoded() -> None:
    """Encoding a frame whose header no peer would read raises FrameTooLarge with its size."""
    with pytest.raises(FrameTooLarge) as caught:
        encode(Kind.RUN, {"payload": "\u00e9" * (HEADER_CAP // 6 + 10)})
    assert caught.value.size > HEADER_CAP
    assert len(encode(Kind.RUN, {"payload": "a" * 1000})) < 2000


@pytest.fixture
def limited(env: Env, plugins: PluginFactory) -> Env:
    plugins.write("echo", plugin_id="res.echo", code=ECHO)
    plugins.write("big", plugin_id="res.big", code=BIG)
    plugins.write("abig", plugin_id="res.abig", code=ASYNC_BIG)
    plugins.write("forger", plugin_id="res.forger", code=FORGER)
    return env


async def _process_manager(make_manager: ManagerFactory) -> Any:
    manager = await make_manager(
        TrustMode.STRICT,
        isolation_mode="process",
        isolation_dedicated=("res.forger",),
        max_result_bytes=CAP,
    )
    await manager.discover()
    return manager


async def test_a_payload_no_host_would_accept_is_refused_and_the_host_lives(
    limited: Env, make_manager: ManagerFactory
) -> None:
    """Non-ASCII text that grows past the frame header cap once encoded is refused with
    payload_too_large before anything is sent; the host keeps serving."""
    manager = await _process_manager(make_manager)
    pid = manager.host_of("res.echo").pid
    with pytest.raises(PluginRunError) as caught:
        await manager.run("res.echo", {"text": "\u00e9" * (HEADER_CAP // 5)})
    assert caught.value.code == "payload_too_large"
    assert (await manager.run("res.echo", {"text": "abc"})).result == {"n": 3}
    assert manager.host_of("res.echo").pid == pid


async def test_results_over_the_cap_are_refused_in_process_mode(
    limited: Env, make_manager: ManagerFactory
) -> None:
    """The host refuses a result over the cap; a host taken over by its plugin that sends
    one anyway is refused by the supervisor, before decoding, and is not restarted."""
    manager = await _process_manager(make_manager)
    with pytest.raises(PluginResultInvalid) as caught:
        await manager.run("res.big")
    assert caught.value.code == "plugin_result_too_large"
    pid = manager.host_of("res.forger").pid
    for _ in range(2):
        with pytest.raises(PluginResultInvalid) as caught:
            await manager.run("res.forger")
        assert caught.value.code == "plugin_result_too_large"
        assert f"over plugins.max_result_bytes ({CAP})" in caught.value.message
    assert manager.host_of("res.forger").pid == pid


@pytest.mark.parametrize("plugin_id", ["res.big", "res.abig"])
async def test_results_over_the_cap_are_refused_in_process(
    limited: Env, make_manager: ManagerFactory, plugin_id: str
) -> None:
    """The in-process host (isolation.mode = "none") applies plugins.max_result_bytes too,
    to sync and async plugins alike."""
    manager = await make_manager(TrustMode.STRICT, isolation_mode="none", max_result_bytes=CAP)
    await manager.discover()
    with pytest.raises(PluginResultInvalid) as caught:
        await manager.run(plugin_id)
    assert caught.value.code == "plugin_result_too_large"
    assert (await manager.run("res.echo", {"text": "ab"})).result == {"n": 2}
