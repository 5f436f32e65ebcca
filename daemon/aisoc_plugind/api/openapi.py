"""Describe the API as OpenAPI 3.1, generated from the route table."""

from __future__ import annotations

from typing import Any

import yaml

from aisoc_plugind import __version__
from aisoc_plugind.api.context import (
    Route,
)
from aisoc_plugind.api.guards import NEED_AUDIT
from aisoc_plugind.api.routes import ROUTES
from aisoc_plugind.core.manifest import ID_RE, PLUGIN_TYPES
from aisoc_plugind.core.records import State

__all__ = ["openapi_document", "openapi_yaml"]


_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    204: "No content",
    400: "Invalid input",
    401: "Missing or invalid token",
    403: "The token lacks the permission, or a browser request from another origin",
    404: "No such plugin",
    409: "Conflict with the plugin's state (failed reload: the old version serves on)",
    413: "Body over api.max_body_bytes",
    429: "Too many denied requests from this address (api.denied_burst, api.denied_per_second)",
    422: "The plugin was refused (signature, manifest or code)",
    501: "Not available in this daemon",
    502: "The plugin raised or returned something that is not JSON, or the registry failed",
    503: "Not ready, the audit log cannot be written (audit.fail_closed), or the daemon is "
    "shutting down (daemon_stopping)",
    504: "The plugin did not return within plugins.run_timeout_s",
}


_NULLABLE_STR = {"type": ["string", "null"]}


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            },
            "detail": {"type": "string"},
        },
    },
    "Plugin": {
        "type": "object",
        "required": [
            "id",
            "name",
            "version",
            "plugin_type",
            "state",
            "enabled",
            "signature_status",
            "signing_key_id",
            "error",
            "path",
            "loaded_at",
            "manifest",
        ],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "version": {"type": "string"},
            "plugin_type": {"type": "string"},
            "state": {"enum": [s.value for s in State]},
            "enabled": {"type": "boolean"},
            "signature_status": {"enum": ["verified", "unsigned", "invalid", "skipped", None]},
            "signing_key_id": _NULLABLE_STR,
            "error": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                    },
                ]
            },
            "path": {"type": "string"},
            "loaded_at": {"type": ["string", "null"], "format": "date-time"},
            "manifest": {"type": "object"},
            "digest": _NULLABLE_STR,
            "path_missing": {"type": "boolean"},
            "host": {
                "description": "where the plugin's code runs now (null: not loaded)",
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["pid", "group", "isolated"],
                        "properties": {
                            "pid": {"type": "integer"},
                            "group": {"type": "string"},
                            "isolated": {"type": "boolean"},
                        },
                    },
                ],
            },
        },
    },
    "PluginList": {
        "type": "object",
        "required": ["plugins"],
        "properties": {
            "plugins": {"type": "array", "items": {"$ref": "#/components/schemas/Plugin"}}
        },
    },
    "DiscoverResult": {
        "type": "object",
        "required": ["discovered", "failed"],
        "properties": {
            "discovered": {"type": "array", "items": {"type": "string"}},
            "failed": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["path", "error"],
                    "properties": {"path": {"type": "string"}, "error": {"type": "string"}},
                },
            },
        },
    },
    "RunRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"payload": {"type": "object"}, "context": {"type": "object"}},
    },
    "ReloadRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "allow_downgrade": {
                "type": "boolean",
                "description": "the operator's word to lower the version (or change it to or "
                "from one that is not semantic versioning); without it such a reload is 409 "
                "version_downgrade",
            }
        },
    },
    "RunResult": {
        "type": "object",
        "required": ["plugin_id", "result", "duration_ms"],
        "properties": {
            "plugin_id": {"type": "string"},
            "result": {"type": "object"},
            "duration_ms": {"type": "number"},
        },
    },
    "InstallRequest": {
        "type": "object",
        "required": ["oci_ref"],
        "additionalProperties": False,
        "properties": {
            "oci_ref": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,1024}$", "maxLength": 1024},
            "replace": {
                "type": "boolean",
                "description": "upgrade an installed id in place (the old directory moves to "
                ".previous/<id>@<version>/ once the new version serves)",
            },
        },
    },
    "InstallResult": {
        "type": "object",
        "required": ["plugin_id", "oci_ref", "digest"],
        "properties": {
            "plugin_id": {"type": "string"},
            "oci_ref": {"type": "string"},
            "digest": {"type": "string"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "audit", "plugins"],
        "properties": {
            "status": {"enum": ["ok", "starting"]},
            "audit": {"enum": ["ok", "failing"]},
            "plugins": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
}


_QUERY = {
    "plugin_type": {"enum": sorted(PLUGIN_TYPES)},
    "state": {"enum": [s.value for s in State]},
}


def _media(route: Route) -> dict[str, Any]:
    if route.path == "/metrics":
        return {"text/plain": {"schema": {"type": "string"}}}
    if route.response is None:
        return {"application/json": {"schema": {"type": "object"}}}
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.response}"}}}


def _responses(route: Route) -> dict[str, Any]:
    out: dict[str, Any] = {str(route.ok): {"description": _STATUS_TEXT[route.ok]}}
    if route.ok != 204:
        out[str(route.ok)]["content"] = _media(route)
    statuses = list(route.errors) + ([401, 403, 429] if route.permission else [])
    statuses += [503] if route.permission in NEED_AUDIT else []
    for status in sorted(set(statuses)):
        out[str(status)] = {
            "description": _STATUS_TEXT[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    out["default"] = {
        "description": "Any other error (421 foreign Host, 405, ...)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    return out


def _parameters(route: Route) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    if "{id}" in route.path:
        params.append(
            {
                "name": "id",
                "in": "path",
                "required": True,
                "description": "The plugin's manifest id.",
                "schema": {"type": "string", "pattern": ID_RE.pattern},
            }
        )
    params += [
        {"name": q, "in": "query", "required": False, "schema": _QUERY[q]} for q in route.query
    ]
    return params


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.handler.__name__,
        "summary": route.summary,
        "x-required-permission": route.permission,
        "security": [{"bearer": []}] if route.permission else [],
    }
    if params := _parameters(route):
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": route.body_required,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}
            },
        }
    op["responses"] = _responses(route)
    return op


def openapi_document() -> dict[str, Any]:
    """Return the OpenAPI 3.1 description of every route in `ROUTES`."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "aisoc-plugind control API",
            "version": __version__,
            "description": "Plugin lifecycle control of aisoc-plugind. Each operation "
            "names its one required permission in "
            "`x-required-permission` (null: no token needed).",
        },
        "servers": [{"url": "http://127.0.0.1:8470"}],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `aisoc-plugind token create`.",
                }
            },
        },
    }


def openapi_yaml() -> str:
    """Return `docs/openapi.yaml` as it must be (regenerate it from this)."""
    header = (
        "# Generated from aisoc_plugind.api ROUTES; do not edit. Regenerate with:\n"
        "#   .venv/bin/python -c 'from aisoc_plugind.api.openapi import openapi_yaml; "
        'print(openapi_yaml(), end="")\' > docs/openapi.yaml\n'
    )
    return header + yaml.safe_dump(
        openapi_document(), sort_keys=False, allow_unicode=True, width=100
    )
