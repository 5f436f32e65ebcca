"""Fuzz every operation of the OpenAPI document against a live server: never a 500.

schemathesis generates valid (positive) and invalid (negative) requests for each operation
from `docs/openapi.yaml`'s source, `openapi_document()`; they are sent with the
all-permissions token to a real server on loopback. Any 5xx the operation does not
document (502/504 from a failing plugin are documented on /run) fails, and every answer
must carry a request id and, when it is an error, the §6 error shape.
"""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import content_type_conformance, response_schema_conformance

from aisoc_plugind.api.openapi import openapi_document
from tests.api_fixtures import ECHO_ID, Api, api_in_thread
from tests.conftest import Env, PluginFactory

DOC = openapi_document()
SCHEMA = schemathesis.openapi.from_dict(DOC)


def _order(op: Any) -> int:
    """Reads and runs first, DELETE last: disabled or unloaded plugins only answer 409."""
    if op.method.upper() == "GET" or op.path.endswith("/run"):
        return 0
    return 2 if op.method.upper() == "DELETE" else 1


OPERATIONS = sorted((result.ok() for result in SCHEMA.get_all_operations()), key=_order)
# Sometimes aim {id} at real plugins, so payloads reach plugin code, not only 404s.
IDS = st.sampled_from([None, ECHO_ID, "example.geoip-enricher", "test.unsigned"])
CONFORMANCE = [response_schema_conformance, content_type_conformance]
SEEN: dict[str, list[int]] = {}
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
SETTINGS = hypothesis.settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    suppress_health_check=list(hypothesis.HealthCheck),
)


def check_answer(op: Any, response: Any) -> None:
    """No undocumented 5xx; a request id always; errors in the §6 shape."""
    status = response.status_code
    documented = DOC["paths"][op.path][op.method.lower()]["responses"]
    assert status != 500, response.text
    assert status < 500 or str(status) in documented, (status, response.text)
    assert response.headers.get("x-request-id"), response.headers  # schemathesis lowercases
    if status >= 400:
        body = response.json()
        assert body["error"]["code"]
        assert body["detail"] == body["error"]["message"]


def fuzz(op: Any, api: Api, session: requests.Session, mode: schemathesis.GenerationMode) -> None:
    """Run one operation's examples in one generation mode."""
    headers = api.auth("root")

    @hypothesis.given(case=op.as_strategy(generation_mode=mode), plugin_id=IDS)
    @SETTINGS
    def run(case: Any, plugin_id: str | None) -> None:
        if plugin_id is not None and "{id}" in op.path:
            case.path_parameters = {**(case.path_parameters or {}), "id": plugin_id}
        response = case.call(base_url=api.url, session=session, headers=headers, timeout=10)
        check_answer(op, response)
        case.validate_response(response, checks=CONFORMANCE)  # bodies match the spec
        SEEN.setdefault(op.label, []).append(response.status_code)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # Negative mode on an operation with nothing to negate (no parameters, no body).
        assert mode is schemathesis.GenerationMode.NEGATIVE


@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
def test_no_generated_request_makes_the_server_fail(
    env: Env, plugins: PluginFactory, mode: schemathesis.GenerationMode
) -> None:
    """Every operation x 25 generated requests: no 500, no undocumented 5xx, no crash."""
    # No OCI fetcher: generated references must not send the daemon out to real registries.
    SEEN.clear()
    with api_in_thread(env, plugins, oci=False) as api, requests.Session() as session:
        for op in OPERATIONS:
            fuzz(op, api, session, mode)
        health = session.get(f"{api.url}/healthz", timeout=10)
    assert health.status_code == 200
    assert 200 in SEEN["POST /api/v1/plugins/{id}/run"], "the fuzzer never reached a plugin"
