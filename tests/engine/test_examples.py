"""The bundled examples load verified in strict mode with the example key, and run."""

from __future__ import annotations

import shutil

from aisoc_plugind.core.signing import TrustMode
from tests.conftest import REPO, Env, ManagerFactory

EXAMPLES = REPO / "examples"


async def test_examples_load_verified_and_run(env: Env, make_manager: ManagerFactory) -> None:
    """Every example plugin is verified by examples/keys and answers its documented result."""
    shutil.rmtree(env.plugins)
    shutil.copytree(EXAMPLES / "plugins", env.plugins)
    for key in env.keys.iterdir():
        key.unlink()
    shutil.copy(EXAMPLES / "keys" / "example-signer.pem", env.keys)
    manager = await make_manager(
        TrustMode.STRICT, plugin_config={"shodan-enricher": {"default_tags": ["t"]}}
    )
    result = await manager.discover()
    assert sorted(result.discovered) == ["shodan-enricher", "wazuh-connector"], result.failed
    assert {r.signing_key_id for r in manager.records()} == {"example-signer"}
    shodan = await manager.run("shodan-enricher", {"ip": "1.1.1.1"})
    assert shodan.result["org"] == "Cloudflare" and shodan.result["tags"][-1] == "t"
    wazuh = await manager.run("wazuh-connector", {"alert": {"rule": {"level": 10, "id": 5710}}})
    assert wazuh.result["severity"] == "high" and wazuh.result["rule_id"] == "5710"
