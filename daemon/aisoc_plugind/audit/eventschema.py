"""The JSON Schema of native events (`docs/events.schema.json`), built from the code.

Built, not hand-written, so that it cannot drift: the event names are `names.ALL`, the states
and signature statuses are the engine's enums. The suite checks the shipped file against
this function and every native event the test suite produces against the file
(`tests/conftest.py`). Regenerate with `python -m aisoc_plugind.audit.eventschema >
docs/events.schema.json`.

Fields an event does not have are absent, never null. Events may carry fields beyond the
common ones listed here (a SIEM should keep unknown fields), so `additionalProperties` is
open, but every listed field has a fixed type wherever it appears.
"""

from __future__ import annotations

import json
from typing import Any

from aisoc_plugind.audit import names as ev
from aisoc_plugind.audit.stdout import LEVELS
from aisoc_plugind.core.records import State
from aisoc_plugind.core.signing import SignatureStatus

__all__ = ["SCHEMA_ID", "event_schema", "main"]

SCHEMA_ID = "https://aisoc.example/schemas/aisoc-plugind/events.schema.json"
_RFC3339 = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
_CODE = r"^[a-z][a-z0-9_]*$"
_UNNUMBERED = {
    ev.LOG_RECORD,
    ev.AUDIT_REOPENED,
    ev.AUDIT_GAP,
    ev.AUDIT_CHECKPOINT,
    ev.AUDIT_WRITE_FAILED,
}


def _str(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _common() -> dict[str, Any]:
    states = [s.value for s in State]
    return {
        "timestamp": _str("RFC 3339 UTC time the event was made, with fraction", pattern=_RFC3339),
        "event": {"enum": sorted(ev.ALL), "description": "dotted event name"},
        "level": {"enum": sorted(LEVELS, key=LEVELS.__getitem__)},
        "seq": {
            "type": "integer",
            "minimum": 1,
            "description": "monotonic per daemon run; absent on library log records and on "
            "the audit writer's own records (audit.reopened, audit.gap, audit.checkpoint, "
            "audit.write_failed)",
        },
        "prev": _str(
            "audit file only: SHA-256 hex of the previous line (64 zeros for the first)",
            pattern="^[0-9a-f]{64}$",
        ),
        "truncated": {"const": True, "description": "string values were cut to fit 8192 bytes"},
        "plugin_id": _str("manifest id of the plugin concerned"),
        "plugin_ids": {"type": "array", "items": {"type": "string"}},
        "path": _str("plugin directory or file concerned"),
        "version": _str("plugin (or daemon, on daemon.started) version"),
        "from_state": {"enum": states},
        "to_state": {"enum": states},
        "signature_status": {"enum": [s.value for s in SignatureStatus]},
        "signing_key_id": _str("file stem of the trusted key that verified the plugin"),
        "error_code": _str("stable snake_case reason", pattern=_CODE),
        "error": _str("human-readable reason; never a secret"),
        "actor": _str("token name, or system"),
        "request_id": _str("X-Request-Id of the API call"),
        "duration_ms": {"type": "number", "minimum": 0},
        "pid": {"type": "integer", "minimum": 1},
        "reason": _str("why (stop reason, host exit reason, reopen reason, ...)"),
    }


def event_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of one native event."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "aisoc-plugind native event",
        "description": (
            "One line of the audit file (audit.schema = native) or of stdout "
            "(log.format = json): one JSON object per event."
        ),
        "type": "object",
        "required": ["timestamp", "event", "level"],
        "properties": _common(),
        "additionalProperties": True,
        "allOf": [
            {
                # The writer's own records (docs/audit.md) and library log records carry
                # no seq; every daemon event does.
                "if": {"properties": {"event": {"not": {"enum": sorted(_UNNUMBERED)}}}},
                "then": {"required": ["seq"]},
            },
            {
                "if": {
                    "properties": {
                        "event": {
                            "enum": [
                                ev.PLUGIN_LOADED,
                                ev.PLUGIN_ENABLED,
                                ev.PLUGIN_DISABLED,
                                ev.PLUGIN_UNLOADED,
                                ev.PLUGIN_RUN_COMPLETED,
                                ev.PLUGIN_RUN_FAILED,
                                ev.PLUGIN_RELOAD_COMPLETED,
                            ]
                        }
                    }
                },
                "then": {"required": ["plugin_id"]},
            },
            {
                "if": {
                    "properties": {
                        "event": {
                            "enum": [
                                ev.PLUGIN_LOAD_FAILED,
                                ev.PLUGIN_RELOAD_FAILED,
                                ev.PLUGIN_RUN_FAILED,
                                ev.PLUGIN_INSTALL_FAILED,
                            ]
                        }
                    }
                },
                "then": {"required": ["error_code"]},
            },
            {
                # docs/api.md lists every denial reason
                "if": {"properties": {"event": {"const": ev.API_DENIED}}},
                "then": {
                    "required": ["reason", "status"],
                    "properties": {"reason": {"pattern": _CODE}, "status": {"type": "integer"}},
                },
            },
        ],
    }


def main() -> None:
    """Print the schema (the content of docs/events.schema.json)."""
    print(json.dumps(event_schema(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
