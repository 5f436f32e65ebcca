"""Map native events to Elastic Common Schema and OCSF documents, as pure functions.

`to_ecs` and `to_ocsf` take one native event (the mapping `EventLog.emit` returns) and return
a new document; neither does I/O, mutates its input or copies values (strings, lists and
nested objects of the event are shared with the result). Everything that depends only on the
event name is decided at import time (`_PLANS`); per event there is a dict lookup per field
and the dict building. Unknown names get a generic plan from their first dotted segment.

Targets: ECS 9.4.0 (`ECS_VERSION`) and OCSF 1.8.0 (`OCSF_VERSION`), class 6002 Application
Lifecycle with the `datetime` and `host` profiles (`time_dt`; `actor` belongs to `host`).
docs/siem/schemas.md has the per-event tables and queries.

Nothing native is dropped. ECS: every field goes to an ECS field of the right type or under
the custom namespace `aisoc.*` (`aisoc.plugin.*`, `aisoc.trust.*`, `aisoc.host.*`, ...); a
field this module does not know, or whose value has a type the target cannot hold, goes to
`aisoc.unmapped.<native name>`. OCSF: fields without an attribute in class 6002 go to
`unmapped.<native name>`. So a field may move from `unmapped` to a named place when this
module learns it, never the other way.

Decisions, with the reasons:

- ECS `event.kind` is `alert` for `plugin.signature.invalid` and `plugin.revoked` (code the
  daemon cannot trust was found); every other event, denials included, is `event`: a denied
  API call is routine and would flood alert queues. Denials carry `event.type: denied` and
  `event.outcome: failure`.
- ECS `event.outcome` is left out where success or failure makes no sense (ECS says
  `unknown` is only for attempts whose result is not known yet, e.g. `daemon.reloading`).
  OCSF `status_id` is then 0 Unknown. `api.request` takes its outcome from the HTTP status,
  `plugin.host.exited` from its `reason` (`stopped` is a success).
- Severity: `level` is kept verbatim (ECS `log.level`, OCSF `metadata.log_level`); ECS
  `event.severity` and OCSF `severity_id` share one number: debug/info 1, notice 2,
  warning 3, error 4, critical 5, fatal 6, anything else 0.
- Time: ECS `@timestamp` and OCSF `time_dt` are the native RFC 3339 string (microseconds);
  OCSF `time` is epoch milliseconds. `to_ocsf` raises ValueError when `timestamp` is not
  RFC 3339 with a zone (`EventLog` always writes one).
- OCSF `app` is the plugin when the event names one (`plugin_id`; `version`, `path` go with
  it), the plugin host for `plugin.host.*`, else the daemon itself. Class 6002 has no
  `src_endpoint` and its `api` needs the `cloud` profile, so `peer`, `route`, `method` and
  `status` stay in `unmapped`; `request_id` is `metadata.correlation_uid`.
- The hash chain: the audit writer adds a top-level `"prev"` to the mapped document after
  mapping. No document made here has a top-level `prev` (a native `prev` field would go to
  `aisoc.unmapped.prev` or `unmapped.prev`).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final, TypeGuard

from aisoc_plugind import __version__
from aisoc_plugind.audit import names as ev
from aisoc_plugind.core.clock import parse_rfc3339

__all__ = ["ECS_VERSION", "OCSF_VERSION", "to_ecs", "to_ocsf"]

ECS_VERSION: Final = "9.4.0"
OCSF_VERSION: Final = "1.8.0"

_SERVICE: Final = "aisoc-plugind"
_VENDOR: Final = "AiSOC"
_HOST_APP: Final = "aisoc-plugind-host"
_OCSF_PROFILES: Final = ("datetime", "host")


_OK, _FAIL, _TRYING = "success", "failure", "unknown"
_EVENT, _ALERT = "event", "alert"
_INSTALL, _START, _STOP, _RESTART, _ENABLE, _DISABLE, _UPDATE, _OTHER = 1, 3, 4, 5, 6, 7, 8, 99

_ACTIVITY_NAMES: Final = {
    0: "Unknown",
    1: "Install",
    2: "Remove",
    _START: "Start",
    _STOP: "Stop",
    _RESTART: "Restart",
    _ENABLE: "Enable",
    _DISABLE: "Disable",
    _UPDATE: "Update",
    _OTHER: "Other",
}

# name: (ECS event.kind, event.category, event.type, event.outcome, OCSF activity_id)
_Row = tuple[str, str, str, str | None, int]
_TABLE: Final[dict[str, _Row]] = {
    ev.DAEMON_STARTED: (_EVENT, "process", "start", _OK, _START),
    ev.DAEMON_READY: (_EVENT, "process", "change", _OK, _OTHER),
    ev.DAEMON_RELOADING: (_EVENT, "configuration", "change", _TRYING, _OTHER),
    ev.DAEMON_STOPPING: (_EVENT, "process", "change", _TRYING, _OTHER),
    ev.DAEMON_STOPPED: (_EVENT, "process", "end", _OK, _STOP),
    ev.CONFIG_WARNING: (_EVENT, "configuration", "info", None, _OTHER),
    ev.KEY_SKIPPED: (_EVENT, "configuration", "access", _FAIL, _OTHER),
    ev.KEYS_CHANGED: (_EVENT, "configuration", "change", _OK, _OTHER),
    ev.REVOCATIONS_CHANGED: (_EVENT, "configuration", "change", _OK, _OTHER),
    ev.REVOCATIONS_FAILED: (_EVENT, "configuration", "access", _FAIL, _OTHER),
    ev.AUDIT_REOPENED: (_EVENT, "file", "access", _OK, _OTHER),
    ev.AUDIT_WRITE_FAILED: (_EVENT, "file", "change", _FAIL, _OTHER),
    ev.AUDIT_GAP: (_EVENT, "file", "info", None, _OTHER),
    ev.AUDIT_CHECKPOINT: (_EVENT, "file", "info", None, _OTHER),
    ev.PLUGIN_DISCOVERED: (_EVENT, "package", "info", None, _OTHER),
    ev.PLUGIN_LOADED: (_EVENT, "configuration", "change", _OK, _START),
    ev.PLUGIN_ENABLED: (_EVENT, "configuration", "change", _OK, _ENABLE),
    ev.PLUGIN_DISABLED: (_EVENT, "configuration", "change", _OK, _DISABLE),
    ev.PLUGIN_UNLOADED: (_EVENT, "configuration", "deletion", _OK, _STOP),
    ev.PLUGIN_LOAD_FAILED: (_EVENT, "configuration", "change", _FAIL, _START),
    ev.PLUGIN_LOAD_RETRYING: (_EVENT, "configuration", "change", _TRYING, _START),
    ev.PLUGIN_DUPLICATE_ID: (_EVENT, "configuration", "change", _FAIL, _START),
    ev.PLUGIN_PATH_MISSING: (_EVENT, "file", "deletion", None, _OTHER),
    ev.PLUGIN_SIGNATURE_VERIFIED: (_EVENT, "package", "info", _OK, _OTHER),
    ev.PLUGIN_SIGNATURE_INVALID: (_ALERT, "package", "info", _FAIL, _OTHER),
    ev.PLUGIN_SIGNATURE_UNSIGNED: (_EVENT, "package", "info", _FAIL, _OTHER),
    ev.PLUGIN_SIGNATURE_SKIPPED: (_EVENT, "package", "info", None, _OTHER),
    ev.PLUGIN_RELOAD_COMPLETED: (_EVENT, "configuration", "change", _OK, _UPDATE),
    ev.PLUGIN_RELOAD_FAILED: (_EVENT, "configuration", "change", _FAIL, _UPDATE),
    ev.PLUGIN_RUN_COMPLETED: (_EVENT, "api", "access", _OK, _OTHER),
    ev.PLUGIN_RUN_FAILED: (_EVENT, "api", "access", _FAIL, _OTHER),
    ev.PLUGIN_TEARDOWN_FAILED: (_EVENT, "configuration", "change", _FAIL, _STOP),
    ev.PLUGIN_INSTALL_COMPLETED: (_EVENT, "package", "installation", _OK, _INSTALL),
    ev.PLUGIN_INSTALL_FAILED: (_EVENT, "package", "installation", _FAIL, _INSTALL),
    ev.PLUGIN_INSTALL_UNPINNED: (_EVENT, "package", "installation", _TRYING, _INSTALL),
    ev.PLUGIN_REVOKED: (_ALERT, "configuration", "change", _OK, _DISABLE),
    ev.PLUGIN_VERSION_DOWNGRADED: (_EVENT, "package", "change", _OK, _UPDATE),
    ev.PLUGIN_FOLLOW_UPDATED: (_EVENT, "package", "change", _OK, _UPDATE),
    ev.PLUGIN_FOLLOW_FAILED: (_EVENT, "package", "change", _FAIL, _UPDATE),
    ev.PLUGIN_HOST_STARTED: (_EVENT, "process", "start", _OK, _START),
    ev.PLUGIN_HOST_EXITED: (_EVENT, "process", "end", _TRYING, _STOP),
    ev.PLUGIN_HOST_RESTARTING: (_EVENT, "process", "start", _TRYING, _RESTART),
    ev.API_REQUEST: (_EVENT, "api", "change", _TRYING, _OTHER),
    ev.API_DENIED: (_EVENT, "api", "denied", _FAIL, _OTHER),
    ev.API_ERROR: (_EVENT, "web", "error", _FAIL, _OTHER),
    ev.API_LISTENING: (_EVENT, "network", "start", _OK, _OTHER),
    ev.API_TOKENS_LOADED: (_EVENT, "configuration", "access", _OK, _OTHER),
    ev.API_TOKENS_REFUSED: (_EVENT, "configuration", "access", _FAIL, _OTHER),
    ev.API_CONNECTIONS_LIMITED: (_EVENT, "network", "denied", _FAIL, _OTHER),
    ev.WATCHER_STARTED: (_EVENT, "file", "info", None, _OTHER),
    ev.WATCHER_STOPPED: (_EVENT, "file", "info", None, _OTHER),
    ev.WATCHER_ERROR: (_EVENT, "file", "access", _FAIL, _OTHER),
    ev.PLUGIN_CHANGE_ABORTED: (_EVENT, "configuration", "change", _FAIL, _OTHER),
    ev.LOG_RECORD: (_EVENT, "process", "info", None, _OTHER),
}

# One number for ECS event.severity and OCSF severity_id (whose captions these are).
_SEVERITY: Final = {
    "debug": 1,
    "info": 1,
    "notice": 2,
    "warning": 3,
    "warn": 3,
    "error": 4,
    "exception": 4,
    "critical": 5,
    "fatal": 6,
}
_SEVERITY_NAMES: Final = {
    0: "Unknown",
    1: "Informational",
    2: "Low",
    3: "Medium",
    4: "High",
    5: "Critical",
    6: "Fatal",
}

# Unknown names: category by first segment, outcome by last segment, type `info`, Other.
_FAMILY_CATEGORY: Final = {
    "daemon": "process",
    "config": "configuration",
    "trust": "configuration",
    "audit": "file",
    "plugin": "package",
    "api": "api",
    "watcher": "file",
}
_SUFFIX_OUTCOME: Final = {"failed": _FAIL, "error": _FAIL, "completed": _OK}


def _outcome_by_status(event: Mapping[str, Any]) -> str | None:
    status = event.get("status")
    if not _is_int(status):
        return _TRYING
    return _OK if status < 400 else _FAIL


def _outcome_by_reason(event: Mapping[str, Any]) -> str | None:
    reason = event.get("reason")
    if reason is None:
        return _TRYING
    return _OK if reason == "stopped" else _FAIL


def _outcome_by_error(event: Mapping[str, Any]) -> str | None:
    # daemon.stopped: a stop with an error code (a start that failed) is a failure.
    return _FAIL if event.get("error_code") else _OK


_OutcomeRule = Callable[[Mapping[str, Any]], str | None]
_OUTCOME_RULES: Final[dict[str, _OutcomeRule]] = {
    ev.API_REQUEST: _outcome_by_status,
    ev.PLUGIN_HOST_EXITED: _outcome_by_reason,
    ev.DAEMON_STOPPED: _outcome_by_error,
}


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_strs(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)


def _is_key(value: Any) -> bool:
    return _is_str(value) or _is_int(value)


# A placer writes one native value into the document and says whether it took it.
_Placer = Callable[[dict[str, Any], Any], bool]


def _node(doc: dict[str, Any], heads: tuple[str, ...]) -> dict[str, Any]:
    for head in heads:
        doc = doc.setdefault(head, {})
    return doc


def _at(path: str, check: Callable[[Any], bool]) -> _Placer:
    """Return a placer that puts a value passing `check` at the dotted ECS `path`."""
    *heads, leaf = path.split(".")
    parents = tuple(heads)

    def place(doc: dict[str, Any], value: Any) -> bool:
        if not check(value):
            return False
        _node(doc, parents)[leaf] = value
        return True

    return place


def _place_level(doc: dict[str, Any], value: Any) -> bool:
    if not _is_str(value):
        return False
    doc.setdefault("log", {})["level"] = value
    doc.setdefault("event", {})["severity"] = _SEVERITY.get(value, 0)
    return True


def _place_duration(doc: dict[str, Any], value: Any) -> bool:
    if not _is_number(value):
        return False
    doc.setdefault("event", {})["duration"] = round(value * 1_000_000)  # ECS: nanoseconds
    return True


def _place_peer(doc: dict[str, Any], value: Any) -> bool:
    if not _is_str(value):
        return False
    source = doc.setdefault("source", {})
    source["address"] = value  # ECS: the raw address always, and .ip when it is one
    if _ip(value):
        source["ip"] = value
    return True


def _ip(text: str) -> bool:
    if text[:1] not in _IP_FIRST:  # most peers that are no IP ("unix:...") end here, cheaply
        return False
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    # A zone index (fe80::1%eth0) is valid Python but not an Elasticsearch `ip`.
    return not isinstance(address, ipaddress.IPv6Address) or address.scope_id is None


_IP_FIRST: Final = frozenset("0123456789abcdefABCDEF:")

_ECS_COMMON: Final[dict[str, _Placer]] = {
    "timestamp": _at("@timestamp", _is_str),
    "event": _at("event.action", _is_str),
    "level": _place_level,
    "seq": _at("event.sequence", _is_int),
    "duration_ms": _place_duration,
    "reason": _at("event.reason", _is_str),
    "error_code": _at("error.code", _is_str),
    "error": _at("error.message", _is_str),
    "actor": _at("user.name", _is_str),
    "peer": _place_peer,
    "request_id": _at("http.request.id", _is_str),
    "method": _at("http.request.method", _is_str),
    "status": _at("http.response.status_code", _is_int),
    "route": _at("url.path", _is_str),
    "pid": _at("process.pid", _is_int),
    "exit_code": _at("process.exit_code", _is_int),
    "path": _at("file.path", _is_str),
    "environment": _at("service.environment", _is_str),
    "plugin_id": _at("aisoc.plugin.id", _is_str),
    "version": _at("aisoc.plugin.version", _is_str),
    "from_version": _at("aisoc.plugin.from_version", _is_str),
    "state": _at("aisoc.plugin.state", _is_str),
    "from_state": _at("aisoc.plugin.from_state", _is_str),
    "to_state": _at("aisoc.plugin.to_state", _is_str),
    "signature_status": _at("aisoc.plugin.signature_status", _is_str),
    "signing_key_id": _at("aisoc.plugin.signing_key_id", _is_str),
    "digest": _at("aisoc.plugin.digest", _is_str),
    "files": _at("aisoc.plugin.files", _is_int),
    "loaded_path": _at("aisoc.plugin.loaded_path", _is_str),
    "oci_ref": _at("aisoc.plugin.oci_ref", _is_str),
    "ref": _at("aisoc.follow.ref", _is_str),
    "trust_mode": _at("aisoc.trust.mode", _is_str),
    "decision": _at("aisoc.trust.decision", _is_str),
    "keys": _at("aisoc.trust.keys", _is_strs),
    "added": _at("aisoc.trust.added", _is_strs),
    "removed": _at("aisoc.trust.removed", _is_strs),
    "plugins_affected": _at("aisoc.trust.plugins_affected", _is_strs),
    "group": _at("aisoc.host.group", _is_str),
    "plugin_ids": _at("aisoc.host.plugin_ids", _is_strs),
    "signal": _at("aisoc.host.signal", _is_key),
    "attempt": _at("aisoc.host.attempt", _is_int),
    "delay_s": _at("aisoc.host.delay_s", _is_number),
    "count": _at("aisoc.audit.count", _is_int),
    "first_seq": _at("aisoc.audit.first_seq", _is_int),
    "last_seq": _at("aisoc.audit.last_seq", _is_int),
    "chain_hash": _at("aisoc.audit.chain_hash", _is_str),
    "signature": _at("aisoc.audit.signature", _is_str),
    "truncated": _at("aisoc.audit.truncated", _is_bool),
    "required_permission": _at("aisoc.api.required_permission", _is_str),
    "suppressed": _at("aisoc.api.suppressed", _is_int),
    "where": _at("aisoc.api.where", _is_str),
    "listen": _at("aisoc.api.listen", _is_str),
    "addresses": _at("aisoc.api.addresses", _is_strs),
    "tls": _at("aisoc.api.tls", _is_bool),
    "tokens": _at("aisoc.api.tokens", _is_int),
    "names": _at("aisoc.api.token_names", _is_strs),
    "problems": _at("aisoc.api.problems", _is_strs),
    "trigger": _at("aisoc.api.trigger", _is_str),
    "plugins_dir": _at("aisoc.daemon.plugins_dir", _is_str),
    "config_file": _at("aisoc.daemon.config_file", _is_str),
    "plugins": _at("aisoc.daemon.plugins", _is_int),
    "failed": _at("aisoc.daemon.failed", _is_int),
    "inflight": _at("aisoc.daemon.inflight", _is_int),
    "grace_s": _at("aisoc.daemon.grace_s", _is_number),
    "step_ms": _at("aisoc.watcher.step_ms", _is_int),
    "debounce_ms": _at("aisoc.watcher.debounce_ms", _is_int),
}
# The same native name means another thing in these families (one ECS type per field).
_ECS_FAMILY: Final[dict[str, dict[str, _Placer]]] = {
    "daemon": {
        **_ECS_COMMON,
        "version": _at("service.version", _is_str),  # the daemon's own version
        "keys": _at("aisoc.daemon.keys", _is_int),  # a count, not the key ids
    },
}


_CLASS_UID, _CATEGORY_UID = 6002, 6
_STATUS: Final = {_OK: (1, "Success"), _FAIL: (2, "Failure")}
_NO_STATUS: Final = (0, "Unknown")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
# OCSF metadata attribute, native field, check.
_METADATA_FIELDS: Final = (
    ("sequence", "seq", _is_int),
    ("correlation_uid", "request_id", _is_str),
    ("is_truncated", "truncated", _is_bool),
)
# The fields that make `message`, in this order, when present.
_MESSAGE_KEYS: Final = ("plugin_id", "version", "method", "route", "status", "reason", "error_code")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Plan:
    """How events of one name map: ECS categorization and placers, OCSF activity and app."""

    kind: str
    category: str
    type: str
    outcome: str | None
    outcome_rule: _OutcomeRule | None
    activity_id: int
    activity_name: str
    type_name: str
    host_app: bool
    ecs_fields: Mapping[str, _Placer]


def _make_plan(name: str, row: _Row) -> _Plan:
    kind, category, type_, outcome, activity = row
    return _Plan(
        kind=kind,
        category=category,
        type=type_,
        outcome=outcome,
        outcome_rule=_OUTCOME_RULES.get(name),
        activity_id=activity,
        # OCSF: with activity Other, the name is the source's own (the event name).
        activity_name=name if activity == _OTHER else _ACTIVITY_NAMES[activity],
        type_name=f"Application Lifecycle: {_ACTIVITY_NAMES[activity]}",
        host_app=name.startswith("plugin.host."),
        ecs_fields=_ECS_FAMILY.get(name.partition(".")[0], _ECS_COMMON),
    )


_PLANS: Final = {name: _make_plan(name, row) for name, row in _TABLE.items()}


@lru_cache(maxsize=256)
def _generic_plan(name: str) -> _Plan:
    family, _, rest = name.partition(".")
    outcome = _SUFFIX_OUTCOME.get(rest.rpartition(".")[2]) if rest else None
    category = _FAMILY_CATEGORY.get(family, "configuration")
    return _make_plan(name, (_EVENT, category, "info", outcome, _OTHER))


def _plan_for(name: str) -> _Plan:
    plan = _PLANS.get(name)
    return plan if plan is not None else _generic_plan(name)


def _outcome(plan: _Plan, event: Mapping[str, Any]) -> str | None:
    return plan.outcome if plan.outcome_rule is None else plan.outcome_rule(event)


def _message(name: str, event: Mapping[str, Any]) -> str:
    parts = [f"{key}={event[key]}" for key in _MESSAGE_KEYS if key in event]
    return " ".join((name, *parts))


def to_ecs(event: Mapping[str, Any]) -> dict[str, Any]:
    """Return the ECS document for one native event (see the module docstring)."""
    name = event["event"]
    plan = _plan_for(name)
    doc: dict[str, Any] = {}
    unmapped: dict[str, Any] = {}
    for key, value in event.items():
        place = plan.ecs_fields.get(key)
        if place is None or not place(doc, value):
            unmapped[key] = value
    doc["message"] = _message(name, event)
    _ecs_constants(doc, plan, event)
    if unmapped:
        doc.setdefault("aisoc", {})["unmapped"] = unmapped
    return doc


def _ecs_constants(doc: dict[str, Any], plan: _Plan, event: Mapping[str, Any]) -> None:
    head = doc.setdefault("event", {})
    head.update(
        kind=plan.kind,
        category=[plan.category],
        type=[plan.type],
        module="aisoc_plugind",
        dataset="aisoc_plugind.audit",
    )
    outcome = _outcome(plan, event)
    if outcome is not None:
        head["outcome"] = outcome
    doc["ecs"] = {"version": ECS_VERSION}
    service = doc.setdefault("service", {})
    service["name"] = _SERVICE
    service.setdefault("version", __version__)


def to_ocsf(event: Mapping[str, Any]) -> dict[str, Any]:
    """Return the OCSF Application Lifecycle (6002) event for one native event.

    Raise ValueError when `timestamp` is not an RFC 3339 string with a zone.
    """
    rest = dict(event)
    name = rest.pop("event")
    plan = _plan_for(name)
    stamp = rest.pop("timestamp")
    level = _take(rest, "level", _is_str)
    doc = _ocsf_head(plan, stamp, _SEVERITY.get(level, 0) if level is not None else 0)
    doc["message"] = _message(name, event)
    doc["metadata"] = _metadata(name, level, rest)
    doc["app"] = _app(plan, rest)
    _ocsf_status(doc, _outcome(plan, event), rest)
    _ocsf_details(doc, rest)
    if rest:
        doc["unmapped"] = rest
    return doc


def _take(rest: dict[str, Any], key: str, check: Callable[[Any], bool]) -> Any:
    """Pop `key` from `rest` when its value passes `check`; else leave it there (None)."""
    value = rest.get(key)
    if value is None or not check(value):
        return None
    del rest[key]
    return value


def _epoch_ms(stamp: Any) -> int:
    if not isinstance(stamp, str):
        raise ValueError(f"timestamp is not a string: {stamp!r}")
    return (parse_rfc3339(stamp) - _EPOCH) // _MS


def _ocsf_head(plan: _Plan, stamp: Any, severity: int) -> dict[str, Any]:
    return {
        "time": _epoch_ms(stamp),
        "time_dt": stamp,
        "timezone_offset": 0,
        "class_uid": _CLASS_UID,
        "class_name": "Application Lifecycle",
        "category_uid": _CATEGORY_UID,
        "category_name": "Application Activity",
        "activity_id": plan.activity_id,
        "activity_name": plan.activity_name,
        "type_uid": _CLASS_UID * 100 + plan.activity_id,
        "type_name": plan.type_name,
        "severity_id": severity,
        "severity": _SEVERITY_NAMES[severity],
    }


def _metadata(name: str, level: str | None, rest: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "version": OCSF_VERSION,
        "profiles": list(_OCSF_PROFILES),
        "product": {"name": _SERVICE, "vendor_name": _VENDOR, "version": __version__},
        "log_name": "audit",
        "log_provider": _SERVICE,
        "event_code": name,
    }
    if level is not None:
        meta["log_level"] = level
    for attribute, key, check in _METADATA_FIELDS:
        value = _take(rest, key, check)
        if value is not None:
            meta[attribute] = value
    return meta


def _app(plan: _Plan, rest: dict[str, Any]) -> dict[str, Any]:
    if plan.host_app:
        app = {"name": _HOST_APP, "vendor_name": _VENDOR, "version": __version__}
        group = _take(rest, "group", _is_str)
        return app if group is None else {**app, "uid": group}
    plugin_id = _take(rest, "plugin_id", _is_str)
    if plugin_id is None:
        app = {"name": _SERVICE, "vendor_name": _VENDOR, "version": __version__}
    else:
        app = {"name": plugin_id, "uid": plugin_id}
        path = _take(rest, "path", _is_str)
        if path is not None:
            app["path"] = path
    version = _take(rest, "version", _is_str)
    if version is not None:
        app["version"] = version
    return app


def _ocsf_status(doc: dict[str, Any], outcome: str | None, rest: dict[str, Any]) -> None:
    doc["status_id"], doc["status"] = _STATUS.get(outcome or "", _NO_STATUS)
    code = _take(rest, "error_code", _is_str)
    if code is not None:
        doc["status_code"] = code
    detail = _take(rest, "error", _is_str)
    if detail is None:  # `reason` explains the outcome when there is no error text
        detail = _take(rest, "reason", _is_str)
    if detail is not None:
        doc["status_detail"] = detail


def _ocsf_details(doc: dict[str, Any], rest: dict[str, Any]) -> None:
    actor = _take(rest, "actor", _is_str)
    if actor is not None:
        doc["actor"] = {"user": {"name": actor}}
    duration = rest.get("duration_ms")
    if _is_number(duration):
        doc["duration"] = round(duration)
        if doc["duration"] == duration:  # a fraction of a millisecond stays in `unmapped`
            del rest["duration_ms"]
