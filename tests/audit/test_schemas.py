"""ECS and OCSF mappings: every event name, checked against the published schemas.

OCSF: outputs are validated with `jsonschema` against the JSON Schema that the PyPI package
`ocsf-json-schema` (dev extra) generates from the OCSF 1.8.0 export it ships, for class
`application_lifecycle` (6002) with the `datetime` and `host` profiles; captions are checked
against the same export.

ECS: no PyPI package ships the ECS field definitions (`ecs-logging` formats log records, it
has no field list; Elastic publishes `ecs_flat.yml` only in the elastic/ecs repository). So
the ECS checks use a VENDORED MINIMAL SUBSET of ECS 9.4.0, below (`ECS_*`), copied from
https://github.com/elastic/ecs tag v9.4.0 (commit 354fd8d0ca99faa15405d1ea1d3bb396724d3e5a),
file generated/ecs/ecs_flat.yml (sha256
f2c78b7c68503d42f5713ebea63fbfafbbeb7056f0d3ec7208c9cc2202ba7d8f): the type of each ECS field
the mapping emits, the allowed values of the categorization fields, the expected
category/type pairs and the top-level field set names. A new ECS field in the mapping fails
`test_ecs_fields_are_ecs_or_custom` until it is added here from that file.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Iterator
from datetime import datetime
from functools import cache
from typing import Any

import jsonschema
import pytest
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

from aisoc_plugind import __version__
from aisoc_plugind.audit import names
from aisoc_plugind.audit.schemas import ECS_VERSION, OCSF_VERSION, to_ecs, to_ocsf

# --- VENDORED MINIMAL SUBSET of ECS 9.4.0 (source and checksum: module docstring) -------

ECS_FIELD_TYPES = {
    "@timestamp": "date",
    "message": "match_only_text",
    "ecs.version": "keyword",
    "log.level": "keyword",
    "event.action": "keyword",
    "event.kind": "keyword",
    "event.category": "keyword",
    "event.type": "keyword",
    "event.outcome": "keyword",
    "event.module": "keyword",
    "event.dataset": "keyword",
    "event.severity": "long",
    "event.sequence": "long",
    "event.duration": "long",
    "event.reason": "keyword",
    "service.name": "keyword",
    "service.version": "keyword",
    "service.environment": "keyword",
    "user.name": "keyword",
    "source.address": "keyword",
    "source.ip": "ip",
    "http.request.id": "keyword",
    "http.request.method": "keyword",
    "http.response.status_code": "long",
    "url.path": "wildcard",
    "error.code": "keyword",
    "error.message": "match_only_text",
    "process.pid": "long",
    "process.exit_code": "long",
    "file.path": "keyword",
}
ECS_ARRAYS = {"event.category", "event.type"}  # `normalize: [array]`
ECS_KINDS = {"alert", "asset", "enrichment", "event", "metric", "state", "pipeline_error"}
# ("signal" is an allowed kind too, reserved for Kibana's own alerts: never ours.)
ECS_OUTCOMES = {"failure", "success", "unknown"}
ECS_TYPES = {
    "access", "admin", "allowed", "change", "connection", "creation", "deletion", "denied",
    "device", "end", "error", "group", "indicator", "info", "installation", "protocol",
    "start", "user",
}  # fmt: skip
ECS_CATEGORY_TYPES = {
    "api": {"access", "admin", "allowed", "change", "creation", "deletion", "denied", "end",
            "info", "start", "user"},
    "authentication": {"start", "end", "info"},
    "configuration": {"access", "change", "creation", "deletion", "info"},
    "database": {"access", "change", "info", "error"},
    "driver": {"change", "end", "info", "start"},
    "email": {"info"},
    "file": {"access", "change", "creation", "deletion", "info"},
    "host": {"access", "change", "end", "info", "start"},
    "iam": {"admin", "change", "creation", "deletion", "group", "info", "user"},
    "intrusion_detection": {"allowed", "denied", "info"},
    "library": {"start"},
    "malware": {"info"},
    "network": {"access", "allowed", "connection", "denied", "end", "info", "protocol",
                "start"},
    "package": {"access", "change", "deletion", "info", "installation", "start"},
    "process": {"access", "change", "end", "info", "start"},
    "registry": {"access", "change", "creation", "deletion"},
    "session": {"start", "end", "info"},
    "threat": {"indicator"},
    "vulnerability": {"info"},
    "web": {"access", "error", "info"},
}  # fmt: skip
ECS_FIELD_SETS = {
    "@timestamp", "agent", "client", "cloud", "container", "data_stream", "destination",
    "device", "dll", "dns", "ecs", "email", "entity", "error", "event", "faas", "file",
    "gen_ai", "group", "host", "http", "labels", "log", "message", "network", "observer",
    "orchestrator", "organization", "package", "process", "registry", "related", "rule",
    "server", "service", "source", "span", "tags", "threat", "tls", "trace", "transaction",
    "url", "user", "user_agent", "volume", "vulnerability",
}  # fmt: skip

# --- Native events: every name, with the fields its emitter sets --------------------------

STAMP = "2026-05-01T12:00:00.123456Z"
STAMP_MS = 1_777_636_800_123
KEY_ID = "8f14e45fceea167a"
DIGEST = "9b74c9897bac770ffc029102a200c5de" * 2
PLUGIN = {"plugin_id": "hello", "path": "/var/lib/aisoc/plugins/hello", "version": "1.2.0"}
CALLER = {"actor": "ops", "request_id": "01J9ZQ4T7N3V5X8Y2B6C4D0E1F"}
UPCOMING: set[str] = set()  # every announced event name is in names.py now


def native(name: str, level: str = "info", seq: int = 1, **fields: Any) -> dict[str, Any]:
    """Return an event as `EventLog.emit` writes it (core keys first)."""
    return {"timestamp": STAMP, "event": name, "level": level, "seq": seq, **fields}


def state(name: str, before: str | None, after: str, **more: Any) -> dict[str, Any]:
    """Return a lifecycle transition as `EngineEvents.state` writes it."""
    moved = {"from_state": before} if before else {}
    trust = {"signature_status": "verified", "signing_key_id": KEY_ID}
    return native(name, **PLUGIN, **moved, to_state=after, **trust, **more)


def signature(name: str, level: str, status: str, decision: str, reason: str) -> dict[str, Any]:
    """Return a trust decision as `TrustGate.decide` writes it."""
    key = {"signing_key_id": KEY_ID} if status == "verified" else {}
    return native(
        name,
        level,
        **PLUGIN,
        signature_status=status,
        **key,
        digest=DIGEST,
        trust_mode="strict" if status != "skipped" else "off",
        decision=decision,
        reason=reason,
        files=4,
        actor="system",
    )


EVENTS: list[dict[str, Any]] = [
    native(
        names.DAEMON_STARTED,
        version=__version__,
        pid=4242,
        trust_mode="strict",
        plugins_dir="/var/lib/aisoc/plugins",
        config_file="/etc/aisoc/plugind.toml",
        environment="production",
    ),
    native(names.DAEMON_READY, plugins=3, failed=1, keys=2),
    native(names.DAEMON_RELOADING),
    native(names.DAEMON_STOPPING, reason="signal", inflight=2),
    native(names.DAEMON_STOPPED, reason="signal"),
    native(names.CONFIG_WARNING, "warning", error_code="tls_not_configured", error="no TLS"),
    native(
        names.KEY_SKIPPED,
        "warning",
        path="/etc/aisoc/keys/old.pem",
        error_code="key_not_pem",
        error="not a PEM file",
    ),
    native(
        names.KEYS_CHANGED,
        keys=[KEY_ID, "c4ca4238a0b92382"],
        added=["c4ca4238a0b92382"],
        removed=["eccbc87e4b5ce2fe"],
        plugins_affected=["hello"],
    ),
    native(
        names.REVOCATIONS_CHANGED,
        path="/etc/aisoc-plugind/revoked.toml",
        keys=[KEY_ID],
        digests=[DIGEST],
        plugins_revoked=["hello"],
        plugins_restored=[],
    ),
    native(
        names.REVOCATIONS_FAILED,
        "error",
        path="/etc/aisoc-plugind/revoked.toml",
        error_code="revoked_file_unparseable",
        error="not valid UTF-8 TOML",
        keys=[KEY_ID],
        digests=[],
    ),
    native(names.AUDIT_REOPENED, path="/var/log/aisoc/audit.jsonl", reason="file_missing"),
    native(
        names.AUDIT_WRITE_FAILED,
        "error",
        path="/var/log/aisoc/audit.jsonl",
        error="[Errno 28] No space left on device",
    ),
    native("audit.gap", "warning", count=3, first_seq=41, last_seq=43),
    native("audit.checkpoint", chain_hash="ab" * 32, signature="c2lnbmF0dXJl" * 8),
    native(
        "plugin.change.aborted",
        "error",
        plugin_id="hello",
        aborted_event="plugin.enabled",
        aborted_seq=41,
        error_code="audit_unavailable",
        actor="ops",
        request_id="8f14e45fceea167a5a36dedd4bea2543",
    ),
    native("log.record", "warning", logger="aiohttp.server", message="Error handling request"),
    native(names.PLUGIN_DISCOVERED, **PLUGIN, to_state="discovered", actor="system"),
    state(names.PLUGIN_LOADED, "discovered", "loaded", actor="system"),
    state(names.PLUGIN_ENABLED, "loaded", "enabled", actor="system"),
    state(names.PLUGIN_DISABLED, "enabled", "disabled", **CALLER),
    state(names.PLUGIN_UNLOADED, "disabled", "unloaded", **CALLER),
    native(
        names.PLUGIN_LOAD_FAILED,
        "error",
        **PLUGIN,
        from_state="discovered",
        to_state="failed",
        signature_status="unsigned",
        error_code="signature_unsigned",
        error="plugin is not signed and trust.mode is strict",
        actor="system",
    ),
    signature(names.PLUGIN_SIGNATURE_VERIFIED, "info", "verified", "load", "signature verified"),
    signature(names.PLUGIN_SIGNATURE_INVALID, "warning", "invalid", "refuse", "no key verifies"),
    signature(names.PLUGIN_SIGNATURE_UNSIGNED, "warning", "unsigned", "load", "unsigned (warn)"),
    signature(names.PLUGIN_SIGNATURE_SKIPPED, "warning", "skipped", "load", "mode is off"),
    native(
        names.PLUGIN_DUPLICATE_ID,
        "warning",
        plugin_id="hello",
        path="/var/lib/aisoc/plugins/hello-copy",
        loaded_path=PLUGIN["path"],
        error_code="duplicate_plugin_id",
        error="id 'hello' is already loaded",
        actor="system",
    ),
    native(names.PLUGIN_PATH_MISSING, "warning", **PLUGIN),
    native(
        names.PLUGIN_RELOAD_COMPLETED,
        **PLUGIN,
        from_version="1.1.0",
        state="enabled",
        signature_status="verified",
        signing_key_id=KEY_ID,
        duration_ms=48.112,
        **CALLER,
    ),
    native(
        names.PLUGIN_RELOAD_FAILED,
        "error",
        **PLUGIN,
        error_code="version_downgrade",
        error="1.0.0 is lower than 1.2.0",
        duration_ms=3,
        actor="system",
    ),
    native(
        names.PLUGIN_RUN_COMPLETED,
        plugin_id="hello",
        version="1.2.0",
        duration_ms=3.217,
        **CALLER,
    ),
    native(
        names.PLUGIN_RUN_FAILED,
        "warning",
        plugin_id="hello",
        version="1.2.0",
        error_code="plugin_timeout",
        error="run did not finish in 30 s",
        duration_ms=30001.5,
        **CALLER,
    ),
    native(
        names.PLUGIN_TEARDOWN_FAILED,
        "warning",
        plugin_id="hello",
        error_code="plugin_error",
        error="RuntimeError in teardown",
    ),
    native(
        names.PLUGIN_INSTALL_COMPLETED,
        plugin_id="hello",
        oci_ref="registry.example/aisoc/hello@sha256:" + DIGEST,
        digest=DIGEST,
        duration_ms=812.4,
        **CALLER,
    ),
    native(
        names.PLUGIN_INSTALL_FAILED,
        "error",
        oci_ref="registry.example/aisoc/hello:1.2",
        error_code="oci_tag_not_pinned",
        error="a tag is not a digest",
        duration_ms=0.8,
        **CALLER,
    ),
    native(
        "plugin.install.unpinned",
        "warning",
        plugin_id="hello",
        oci_ref="registry.example/aisoc/hello:1.2",
        digest=DIGEST,
        **CALLER,
    ),
    native(
        "plugin.revoked",
        "error",
        **PLUGIN,
        from_state="enabled",
        to_state="disabled",
        signing_key_id=KEY_ID,
        digest=DIGEST,
        reason="key_revoked",
        actor="system",
    ),
    native(
        "plugin.version.downgraded",
        "warning",
        **PLUGIN,
        from_version="1.3.0",
        **CALLER,
    ),
    native(
        "plugin.follow.updated",
        ref="registry.example/aisoc/hello:stable",
        digest=DIGEST,
        plugin_id="hello",
        version="1.2.0",
    ),
    native(
        "plugin.follow.failed",
        "warning",
        ref="registry.example/aisoc/hello:stable",
        error_code="oci_unreachable",
    ),
    native("plugin.host.started", pid=5151, group=f"signer:{KEY_ID}", plugin_ids=["hello"]),
    native(
        "plugin.host.exited",
        "warning",
        pid=5151,
        group=f"signer:{KEY_ID}",
        signal=9,
        reason="memory",
    ),
    native(
        "plugin.host.restarting",
        "warning",
        group=f"signer:{KEY_ID}",
        attempt=2,
        delay_s=0.5,
    ),
    native(
        names.API_REQUEST,
        **CALLER,
        route="/api/v1/plugins/{id}/enable",
        method="POST",
        status=200,
        duration_ms=4.125,
        plugin_id="hello",
        peer="127.0.0.1",
    ),
    native(
        names.API_DENIED,
        "warning",
        route="/api/v1/plugins/{id}/enable",
        method="POST",
        status=403,
        required_permission="admin",
        reason="permission_missing",
        actor="ci",
        peer="unix:uid=1000,gid=1000,pid=42",
        request_id="01J9ZQ4T7N3V5X8Y2B6C4D0E1G",
        suppressed=3,
    ),
    native(
        names.API_ERROR,
        "error",
        error_code="internal_error",
        error="KeyError",
        where="/usr/lib/python3/dist-packages/x.py:12",
        route="/api/v1/plugins",
        method="POST",
        request_id="01J9ZQ4T7N3V5X8Y2B6C4D0E1H",
    ),
    native(
        names.API_LISTENING,
        listen="127.0.0.1:8700",
        addresses=["127.0.0.1:8700"],
        tls=False,
    ),
    native(
        names.API_TOKENS_LOADED,
        path="/etc/aisoc/tokens.toml",
        tokens=2,
        names=["ops", "ci"],
        problems=[],
        trigger="startup",
    ),
    native(
        names.API_TOKENS_REFUSED,
        level="error",
        path="/etc/aisoc/tokens.toml",
        error_code="tokens_file_insecure",
        error="/etc/aisoc/tokens.toml is writable by group or others (-rw-rw-r--)",
        tokens=2,
        trigger="sighup",
    ),
    native(
        names.API_CONNECTIONS_LIMITED,
        "warning",
        reason="per_host_limit",
        action="evicted",
        peer="127.0.0.1",
        limit=64,
        open=64,
        suppressed=12,
    ),
    native(
        names.PLUGIN_LOAD_RETRYING,
        "warning",
        path="/var/lib/aisoc/plugins/hello",
        attempt=1,
        max_attempts=8,
        delay_s=0.5,
        error_code="bundle_unreadable",
        error="/var/lib/aisoc/plugins/hello: cannot open directory: Too many open files",
    ),
    native(names.WATCHER_STARTED, path="/var/lib/aisoc/plugins", step_ms=50, debounce_ms=300),
    native(names.WATCHER_STOPPED, path="/var/lib/aisoc/plugins"),
    native(
        names.WATCHER_ERROR,
        "error",
        path="/var/lib/aisoc/plugins",
        error_code="plugins_dir_missing",
        error="FileNotFoundError: plugins dir",
    ),
]
IDS = [e["event"] for e in EVENTS]

# name: ECS (kind, category, type, outcome or None) and OCSF (activity_id, status_id)
EXPECTED: dict[str, tuple[str, str, str, str | None, int, int]] = {
    "daemon.started": ("event", "process", "start", "success", 3, 1),
    "daemon.ready": ("event", "process", "change", "success", 99, 1),
    "daemon.reloading": ("event", "configuration", "change", "unknown", 99, 0),
    "daemon.stopping": ("event", "process", "change", "unknown", 99, 0),
    "daemon.stopped": ("event", "process", "end", "success", 4, 1),
    "config.warning": ("event", "configuration", "info", None, 99, 0),
    "trust.key.skipped": ("event", "configuration", "access", "failure", 99, 2),
    "trust.keys.changed": ("event", "configuration", "change", "success", 99, 1),
    "trust.revocations.changed": ("event", "configuration", "change", "success", 99, 1),
    "trust.revocations.failed": ("event", "configuration", "access", "failure", 99, 2),
    "audit.reopened": ("event", "file", "access", "success", 99, 1),
    "audit.write_failed": ("event", "file", "change", "failure", 99, 2),
    "audit.gap": ("event", "file", "info", None, 99, 0),
    "audit.checkpoint": ("event", "file", "info", None, 99, 0),
    "plugin.change.aborted": ("event", "configuration", "change", "failure", 99, 2),
    "log.record": ("event", "process", "info", None, 99, 0),
    "plugin.discovered": ("event", "package", "info", None, 99, 0),
    "plugin.loaded": ("event", "configuration", "change", "success", 3, 1),
    "plugin.enabled": ("event", "configuration", "change", "success", 6, 1),
    "plugin.disabled": ("event", "configuration", "change", "success", 7, 1),
    "plugin.unloaded": ("event", "configuration", "deletion", "success", 4, 1),
    "plugin.load.failed": ("event", "configuration", "change", "failure", 3, 2),
    "plugin.load.retrying": ("event", "configuration", "change", "unknown", 3, 0),
    "plugin.signature.verified": ("event", "package", "info", "success", 99, 1),
    "plugin.signature.invalid": ("alert", "package", "info", "failure", 99, 2),
    "plugin.signature.unsigned": ("event", "package", "info", "failure", 99, 2),
    "plugin.signature.skipped": ("event", "package", "info", None, 99, 0),
    "plugin.duplicate_id": ("event", "configuration", "change", "failure", 3, 2),
    "plugin.path.missing": ("event", "file", "deletion", None, 99, 0),
    "plugin.reload.completed": ("event", "configuration", "change", "success", 8, 1),
    "plugin.reload.failed": ("event", "configuration", "change", "failure", 8, 2),
    "plugin.run.completed": ("event", "api", "access", "success", 99, 1),
    "plugin.run.failed": ("event", "api", "access", "failure", 99, 2),
    "plugin.teardown.failed": ("event", "configuration", "change", "failure", 4, 2),
    "plugin.install.completed": ("event", "package", "installation", "success", 1, 1),
    "plugin.install.failed": ("event", "package", "installation", "failure", 1, 2),
    "plugin.install.unpinned": ("event", "package", "installation", "unknown", 1, 0),
    "plugin.revoked": ("alert", "configuration", "change", "success", 7, 1),
    "plugin.version.downgraded": ("event", "package", "change", "success", 8, 1),
    "plugin.follow.updated": ("event", "package", "change", "success", 8, 1),
    "plugin.follow.failed": ("event", "package", "change", "failure", 8, 2),
    "plugin.host.started": ("event", "process", "start", "success", 3, 1),
    "plugin.host.exited": ("event", "process", "end", "failure", 4, 2),
    "plugin.host.restarting": ("event", "process", "start", "unknown", 5, 0),
    "api.request": ("event", "api", "change", "success", 99, 1),
    "api.denied": ("event", "api", "denied", "failure", 99, 2),
    "api.error": ("event", "web", "error", "failure", 99, 2),
    "api.listening": ("event", "network", "start", "success", 99, 1),
    "api.tokens.loaded": ("event", "configuration", "access", "success", 99, 1),
    "api.connections.limited": ("event", "network", "denied", "failure", 99, 2),
    "api.tokens.refused": ("event", "configuration", "access", "failure", 99, 2),
    "watcher.started": ("event", "file", "info", None, 99, 0),
    "watcher.stopped": ("event", "file", "info", None, 99, 0),
    "watcher.error": ("event", "file", "access", "failure", 99, 2),
}


# --- Helpers --------------------------------------------------------------------------------


@cache
def ocsf_export() -> dict[str, Any]:
    """The OCSF 1.8.0 schema export shipped by ocsf-json-schema."""
    schema: dict[str, Any] = get_ocsf_schema(version=OCSF_VERSION)
    return schema


@cache
def ocsf_validator() -> jsonschema.Draft202012Validator:
    """A validator for class 6002 with the profiles the mapping declares."""
    embedded = OcsfJsonSchemaEmbedded(ocsf_export())
    schema = embedded.get_class_schema("application_lifecycle", profiles=["datetime", "host"])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def leaves(doc: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (dotted path, value) for every value that is not an object; lists are values."""
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def nodes(doc: Any) -> Iterator[Any]:
    """Yield every value in the document, objects included, at any depth."""
    yield doc
    if isinstance(doc, dict):
        for value in doc.values():
            yield from nodes(value)


def flat(doc: dict[str, Any]) -> dict[str, Any]:
    """The document as {dotted path: value}."""
    return dict(leaves(doc))


def holds(value: Any, ecs_type: str) -> bool:
    """Whether `value` is a valid JSON value for a field of this ECS type."""
    if ecs_type == "long":
        return isinstance(value, int) and not isinstance(value, bool)
    if ecs_type == "ip":
        return isinstance(value, str) and bool(ipaddress.ip_address(value))
    if ecs_type == "date":
        return isinstance(value, str) and datetime.fromisoformat(value).tzinfo is not None
    return isinstance(value, str)  # keyword, wildcard, match_only_text


def caption(attribute: str, value: int) -> str:
    """The caption OCSF 1.8.0 gives `value` of an enumerated attribute of class 6002."""
    attributes = ocsf_export()["classes"]["application_lifecycle"]["attributes"]
    return str(attributes[attribute]["enum"][str(value)]["caption"])


# --- Coverage -------------------------------------------------------------------------------


def test_every_event_name_has_a_realistic_case() -> None:
    """The table covers every name in names.py and every announced upcoming name."""
    assert set(IDS) == names.ALL | UPCOMING
    assert set(EXPECTED) == set(IDS)


# --- ECS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("event", EVENTS, ids=IDS)
def test_ecs_fields_are_ecs_or_custom(event: dict[str, Any]) -> None:
    """Every emitted field is an ECS 9.4.0 field of its type, or under `aisoc.*`."""
    for path, value in flat(to_ecs(event)).items():
        if path.startswith("aisoc."):
            continue
        assert path in ECS_FIELD_TYPES, f"{path} is not an ECS field (or not vendored)"
        values = value if path in ECS_ARRAYS else [value]
        assert isinstance(values, list)
        assert all(holds(v, ECS_FIELD_TYPES[path]) for v in values), (path, value)


@pytest.mark.parametrize("event", EVENTS, ids=IDS)
def test_ecs_categorization_uses_allowed_values(event: dict[str, Any]) -> None:
    """kind, category, type and outcome take ECS allowed values, in expected pairs."""
    head = to_ecs(event)["event"]
    assert head["kind"] in ECS_KINDS
    assert head.get("outcome", "success") in ECS_OUTCOMES
    assert set(head["type"]) <= ECS_TYPES
    for category in head["category"]:
        assert set(head["type"]) <= ECS_CATEGORY_TYPES[category]


@pytest.mark.parametrize("event", EVENTS, ids=IDS)
def test_ecs_categorization_per_event(event: dict[str, Any]) -> None:
    """Each event has the kind, category, type and outcome of the documented table."""
    kind, category, type_, outcome, _, _ = EXPECTED[event["event"]]
    head = to_ecs(event)["event"]
    assert (head["kind"], head["category"], head["type"]) == (kind, [category], [type_])
    assert head.get("outcome") == outcome


@pytest.mark.parametrize("event", EVENTS, ids=IDS)
def test_ecs_core_fields(event: dict[str, Any]) -> None:
    """@timestamp, action, level, sequence, versions and service are always set."""
    doc = to_ecs(event)
    assert doc["@timestamp"] == event["timestamp"]
    assert doc["event"]["action"] == event["event"]
    assert doc["event"]["sequence"] == event["seq"]
    assert doc["log"]["level"] == event["level"]
    assert doc["ecs"] == {"version": ECS_VERSION}
    assert doc["service"]["name"] == "aisoc-plugind"
    assert doc["service"]["version"] == __version__
    assert doc["message"].startswith(event["event"])


def test_custom_namespace_is_not_an_ecs_field_set() -> None:
    """`aisoc` is no ECS 9.4.0 top-level name, so it never collides with ECS."""
    assert "aisoc" not in ECS_FIELD_SETS


def test_ecs_custom_fields_keep_one_type_each() -> None:
    """Across all events an `aisoc.*` field always holds one JSON type (stable mappings)."""
    seen: dict[str, set[str]] = {}
    for event in EVENTS:
        for path, value in flat(to_ecs(event)).items():
            if path.startswith("aisoc.") and not path.startswith("aisoc.unmapped."):
                seen.setdefault(path, set()).add(json_type(value))
    assert {path: kinds for path, kinds in seen.items() if len(kinds) > 1} == {}


def json_type(value: Any) -> str:
    """The JSON type of a value as Elasticsearch's dynamic mapping would see it."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, list):
        return "array of " + ",".join(sorted({json_type(v) for v in value}) or ["any"])
    return {int: "long", float: "float", str: "string"}.get(type(value), "object")


def test_ecs_maps_named_fields() -> None:
    """The ECS fields of an API request come from the native fields they name."""
    event = next(e for e in EVENTS if e["event"] == names.API_REQUEST)
    got = flat(to_ecs(event))
    assert got["user.name"] == "ops"
    assert got["source.address"] == got["source.ip"] == "127.0.0.1"
    assert got["http.request.method"] == "POST"
    assert got["http.request.id"] == CALLER["request_id"]
    assert got["http.response.status_code"] == 200
    assert got["url.path"] == "/api/v1/plugins/{id}/enable"
    assert got["event.duration"] == 4_125_000
    assert got["aisoc.plugin.id"] == "hello"


def test_ecs_plugin_fields_go_under_the_namespace() -> None:
    """A trust decision's plugin and trust fields are under aisoc.plugin and aisoc.trust."""
    event = next(e for e in EVENTS if e["event"] == names.PLUGIN_SIGNATURE_VERIFIED)
    got = flat(to_ecs(event))
    assert got["aisoc.plugin.id"] == "hello"
    assert got["aisoc.plugin.version"] == "1.2.0"
    assert got["aisoc.plugin.signature_status"] == "verified"
    assert got["aisoc.plugin.signing_key_id"] == KEY_ID
    assert got["aisoc.plugin.digest"] == DIGEST
    assert got["aisoc.trust.mode"] == "strict"
    assert got["aisoc.trust.decision"] == "load"
    assert got["event.reason"] == "signature verified"
    assert got["file.path"] == PLUGIN["path"]


def test_ecs_same_name_in_two_families_gets_two_fields() -> None:
    """`keys` counts keys in daemon.ready but lists key ids in trust.keys.changed."""
    ready = flat(to_ecs(native(names.DAEMON_READY, keys=2)))
    changed = flat(to_ecs(native(names.KEYS_CHANGED, keys=[KEY_ID])))
    started = flat(to_ecs(native(names.DAEMON_STARTED, version="9.9.9")))
    assert ready["aisoc.daemon.keys"] == 2
    assert changed["aisoc.trust.keys"] == [KEY_ID]
    assert started["service.version"] == "9.9.9"


@pytest.mark.parametrize(
    ("peer", "ip"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("fe80::1%eth0", False),
        ("unix:uid=1000,gid=1000,pid=42", False),
        ("unix", False),
    ],
)
def test_ecs_peer_is_an_address_and_an_ip_when_it_is_one(peer: str, ip: bool) -> None:
    """source.address is the raw peer; source.ip only for a plain IP literal."""
    source = to_ecs(native(names.API_DENIED, peer=peer))["source"]
    assert source["address"] == peer
    assert ("ip" in source) is ip


# --- OCSF -----------------------------------------------------------------------------------


@pytest.mark.parametrize("event", EVENTS, ids=IDS)
def test_ocsf_validates_against_class_6002(event: dict[str, Any]) -> None:
    """The OCSF document is valid OCSF 1.8.0 Application Lifecycle (datetime, host)."""
    errors = [e.message for e in ocsf_validator().iter_errors(to_ocsf(event))]
    assert errors == []


@pytest.mark.parametrize("event", EVENTS, ids=IDS)
def test_ocsf_activity_and_status_per_event(event: dict[str, Any]) -> None:
    """Each event has the activity and status of the documented table."""
    *_, activity_id, status_id = EXPECTED[event["event"]]
    doc = to_ocsf(event)
    assert (doc["activity_id"], doc["status_id"]) == (activity_id, status_id)
    assert doc["type_uid"] == 6002 * 100 + activity_id
    assert (doc["class_uid"], doc["category_uid"]) == (6002, 6)


@pytest.mark.parametrize("event", EVENTS, ids=IDS)
def test_ocsf_captions_match_their_ids(event: dict[str, Any]) -> None:
    """Every *_name/status/severity string is the schema's caption of its id."""
    doc = to_ocsf(event)
    if doc["activity_id"] == 99:  # Other: the source's own name for the activity
        assert doc["activity_name"] == event["event"]
    else:
        assert doc["activity_name"] == caption("activity_id", doc["activity_id"])
    assert doc["type_name"] == caption("type_uid", doc["type_uid"])
    assert doc["severity"] == caption("severity_id", doc["severity_id"])
    assert doc["status"] == caption("status_id", doc["status_id"])
    assert doc["class_name"] == caption("class_uid", 6002)
    assert doc["category_name"] == caption("category_uid", 6)


@pytest.mark.parametrize("event", EVENTS, ids=IDS)
def test_ocsf_core_fields(event: dict[str, Any]) -> None:
    """Time, metadata (version, product, sequence, event code, level) are always set."""
    doc = to_ocsf(event)
    assert (doc["time"], doc["time_dt"]) == (STAMP_MS, STAMP)
    meta = doc["metadata"]
    assert meta["version"] == OCSF_VERSION
    assert meta["product"] == {
        "name": "aisoc-plugind",
        "vendor_name": "AiSOC",
        "version": __version__,
    }
    assert (meta["sequence"], meta["event_code"]) == (event["seq"], event["event"])
    assert meta["log_level"] == event["level"]
    assert meta["log_name"] == "audit"


def test_ocsf_app_is_the_plugin_when_one_is_named() -> None:
    """app is the plugin (uid = id, version, path), else the host, else the daemon."""
    plugin = to_ocsf(next(e for e in EVENTS if e["event"] == names.PLUGIN_ENABLED))
    host = to_ocsf(next(e for e in EVENTS if e["event"] == "plugin.host.started"))
    daemon = to_ocsf(next(e for e in EVENTS if e["event"] == names.DAEMON_READY))
    assert plugin["app"] == {
        "name": "hello",
        "uid": "hello",
        "path": PLUGIN["path"],
        "version": "1.2.0",
    }
    assert host["app"]["name"] == "aisoc-plugind-host"
    assert host["app"]["uid"] == f"signer:{KEY_ID}"
    assert daemon["app"]["name"] == "aisoc-plugind"


def test_ocsf_status_code_and_detail_come_from_the_error() -> None:
    """status_code is the error code, status_detail the error (or else the reason)."""
    failed = to_ocsf(next(e for e in EVENTS if e["event"] == names.PLUGIN_LOAD_FAILED))
    denied = to_ocsf(next(e for e in EVENTS if e["event"] == names.API_DENIED))
    both = to_ocsf(native(names.PLUGIN_RUN_FAILED, error="boom", reason="crashed"))
    assert failed["status_code"] == "signature_unsigned"
    assert failed["status_detail"].startswith("plugin is not signed")
    assert denied["status_detail"] == "permission_missing"
    assert (both["status_detail"], both["unmapped"]["reason"]) == ("boom", "crashed")


def test_ocsf_actor_and_correlation() -> None:
    """actor.user.name is the token name; request_id correlates events of one request."""
    doc = to_ocsf(next(e for e in EVENTS if e["event"] == names.PLUGIN_RUN_COMPLETED))
    assert doc["actor"] == {"user": {"name": "ops"}}
    assert doc["metadata"]["correlation_uid"] == CALLER["request_id"]


def test_ocsf_keeps_what_class_6002_cannot_say_in_unmapped() -> None:
    """Peer, route, method and HTTP status have no 6002 attribute: they stay unmapped."""
    doc = to_ocsf(next(e for e in EVENTS if e["event"] == names.API_DENIED))
    assert doc["unmapped"]["peer"] == "unix:uid=1000,gid=1000,pid=42"
    assert doc["unmapped"]["status"] == 403
    assert doc["unmapped"]["route"] == "/api/v1/plugins/{id}/enable"


@pytest.mark.parametrize(("ms", "duration", "kept"), [(3, 3, False), (3.217, 3, True)])
def test_ocsf_duration_is_whole_ms_and_keeps_a_fraction(
    ms: float, duration: int, kept: bool
) -> None:
    """duration is whole milliseconds; a fraction keeps the native value in unmapped."""
    doc = to_ocsf(native(names.PLUGIN_RUN_COMPLETED, duration_ms=ms))
    assert doc["duration"] == duration
    assert ("duration_ms" in doc.get("unmapped", {})) is kept


# --- Both -----------------------------------------------------------------------------------

BOTH = [to_ecs, to_ocsf]


@pytest.mark.parametrize("event", EVENTS, ids=IDS)
@pytest.mark.parametrize("mapping", BOTH)
def test_no_native_field_is_lost(mapping: Any, event: dict[str, Any]) -> None:
    """Every native value is somewhere in the output (ECS durations are in ns)."""
    got = list(nodes(mapping(event)))
    for key, value in event.items():
        if mapping is to_ecs and key == "duration_ms":
            value = round(value * 1_000_000)
        assert any(v == value and type(v) is type(value) for v in got), (key, value)


@pytest.mark.parametrize("event", EVENTS, ids=IDS)
@pytest.mark.parametrize("mapping", BOTH)
def test_output_is_json_and_has_no_chain_field(mapping: Any, event: dict[str, Any]) -> None:
    """The output serialises as strict JSON and leaves the top-level `prev` to the writer."""
    doc = mapping(event)
    assert "prev" not in doc
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc


@pytest.mark.parametrize("mapping", BOTH)
def test_input_is_not_changed(mapping: Any) -> None:
    """Mapping reads the event and never writes to it."""
    for event in EVENTS:
        before = copy.deepcopy(event)
        mapping(event)
        assert event == before


@pytest.mark.parametrize(
    ("level", "severity", "name"),
    [
        ("debug", 1, "Informational"),
        ("info", 1, "Informational"),
        ("notice", 2, "Low"),
        ("warning", 3, "Medium"),
        ("error", 4, "High"),
        ("critical", 5, "Critical"),
        ("fatal", 6, "Fatal"),
        ("chatty", 0, "Unknown"),
    ],
)
def test_level_maps_to_one_severity_in_both(level: str, severity: int, name: str) -> None:
    """log.level and metadata.log_level keep the level; both severities share a number."""
    event = native(names.PLUGIN_LOADED, level)
    ecs, ocsf = to_ecs(event), to_ocsf(event)
    assert (ecs["log"]["level"], ecs["event"]["severity"]) == (level, severity)
    assert (ocsf["metadata"]["log_level"], ocsf["severity_id"]) == (level, severity)
    assert ocsf["severity"] == name


@pytest.mark.parametrize(
    ("stamp", "ms"),
    [
        ("1970-01-01T00:00:00.000000Z", 0),
        ("2026-05-01T12:00:00.123999Z", STAMP_MS),
        ("2026-05-01T14:00:00.123456+02:00", STAMP_MS),
        ("2026-05-01T12:00:00Z", STAMP_MS - 123),
    ],
)
def test_timestamps(stamp: str, ms: int) -> None:
    """@timestamp and time_dt keep the string; time is epoch ms, truncated, zone applied."""
    event = native(names.PLUGIN_LOADED) | {"timestamp": stamp}
    ocsf = to_ocsf(event)
    assert to_ecs(event)["@timestamp"] == stamp
    assert (ocsf["time"], ocsf["time_dt"]) == (ms, stamp)


@pytest.mark.parametrize("stamp", ["2026-05-01T12:00:00", "yesterday", 1_777_636_800])
def test_ocsf_refuses_a_time_without_zone(stamp: Any) -> None:
    """A timestamp that is not RFC 3339 with a zone raises ValueError."""
    with pytest.raises(ValueError, match=r"time zone|isoformat|not a string"):
        to_ocsf(native(names.PLUGIN_LOADED) | {"timestamp": stamp})


@pytest.mark.parametrize(
    ("name", "category", "outcome", "status_id"),
    [
        ("plugin.stall", "package", None, 0),
        ("plugin.sandbox.escape.failed", "package", "failure", 2),
        ("delivery.sync.completed", "configuration", "success", 1),
        ("api.throttle.error", "api", "failure", 2),
        ("standalone", "configuration", None, 0),
    ],
)
def test_unknown_names_map_generically(
    name: str, category: str, outcome: str | None, status_id: int
) -> None:
    """An unknown name: category by first segment, outcome by last, OCSF activity Other."""
    event = native(name, "warning", plugin_id="hello", novel_field={"nested": [1, 2]})
    ecs, ocsf = to_ecs(event), to_ocsf(event)
    assert (ecs["event"]["category"], ecs["event"]["type"]) == ([category], ["info"])
    assert ecs["event"].get("outcome") == outcome
    assert ecs["aisoc"]["unmapped"] == {"novel_field": {"nested": [1, 2]}}
    assert (ocsf["activity_id"], ocsf["activity_name"], ocsf["status_id"]) == (99, name, status_id)
    assert ocsf["unmapped"] == {"novel_field": {"nested": [1, 2]}}
    assert ocsf_validator().is_valid(ocsf)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", "403"),
        ("seq", "7"),
        ("pid", True),
        ("keys", 3),
        ("duration_ms", float("nan")),
        ("prev", "0" * 64),
    ],
)
def test_values_of_the_wrong_type_stay_unmapped(field: str, value: Any) -> None:
    """A field whose value its target cannot hold keeps its native name in unmapped."""
    event = native(names.KEYS_CHANGED) | {field: value}
    assert to_ecs(event)["aisoc"]["unmapped"][field] is value
    assert to_ocsf(event)["unmapped"][field] is value


@pytest.mark.parametrize("mapping", BOTH)
def test_non_ascii_and_huge_values_pass_through_unchanged(mapping: Any) -> None:
    """Strings are neither cut, escaped nor copied: the same objects come out."""
    huge = "ß€😀\u202e" * 50_000
    path = "/var/lib/aisoc/plugins/\udcff-bad-utf8"
    event = native(names.PLUGIN_LOAD_FAILED, "error", path=path, error=huge, blob=huge)
    got = list(nodes(mapping(event)))
    assert any(v is huge for v in got)
    assert any(v is path for v in got)
    assert sum(v is huge for v in got) >= 2


@pytest.mark.parametrize(
    ("status", "outcome"), [(200, "success"), (201, "success"), (409, "failure"), (None, "unknown")]
)
def test_api_request_outcome_follows_the_http_status(status: int | None, outcome: str) -> None:
    """api.request succeeds below 400 and fails from 400 on."""
    extra = {} if status is None else {"status": status}
    assert to_ecs(native(names.API_REQUEST, **extra))["event"]["outcome"] == outcome


@pytest.mark.parametrize(
    ("reason", "outcome", "status_id"),
    [("stopped", "success", 1), ("crashed", "failure", 2), ("killed", "failure", 2)],
)
def test_host_exit_outcome_follows_its_reason(reason: str, outcome: str, status_id: int) -> None:
    """A host that was stopped ended well; crashed, timeout, memory and killed did not."""
    event = native("plugin.host.exited", pid=5151, exit_code=0, reason=reason)
    assert to_ecs(event)["event"]["outcome"] == outcome
    assert to_ocsf(event)["status_id"] == status_id
