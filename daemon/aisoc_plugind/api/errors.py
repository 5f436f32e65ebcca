"""Answer errors as JSON with stable codes; map the exception tree to HTTP statuses.

This is the only place that knows which HTTP status answers which error: the engine and the
other layers raise coded exceptions (`aisoc_plugind.errors`) and know nothing of HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from aisoc_plugind import errors

__all__ = ["ApiError", "dumps", "error_body", "error_response", "json_response", "status_for"]


class ApiError(errors.PluginDError):
    """An error the API itself decides (bad input, refusal); `reason` marks a denial."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int,
        reason: str | None = None,
        headers: Mapping[str, str] | None = None,
        actor: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})
        self.actor = actor  # the token a denial is about, when one is known


# By class, most specific first (the first match in the exception's MRO wins).
_STATUS_BY_CLASS: Mapping[type[errors.PluginDError], int] = {
    errors.ManifestError: 422,
    errors.BundleError: 422,
    errors.SignatureRefused: 422,
    errors.KeyFileError: 422,
    errors.PluginLoadError: 422,
    errors.DuplicatePluginId: 409,
    errors.PluginNotFound: 404,
    errors.PluginStateConflict: 409,
    errors.VersionDowngrade: 409,
    errors.PluginRunError: 502,
    errors.PluginTimeout: 504,
    errors.PluginResultInvalid: 502,
    errors.AuthoringError: 400,
    errors.OciReferenceError: 422,
    errors.ArchiveError: 422,
    errors.OciError: 502,
    errors.AuditUnavailable: 503,
    errors.DaemonStopping: 503,
}
# Codes whose answer differs from their class's.
_STATUS_BY_CODE: Mapping[str, int] = {
    "oci_not_configured": 501,
    "oci_tag_not_pinned": 400,
    "oci_registry_not_allowed": 403,
    "payload_too_large": 413,  # a run's payload that no plugin host would accept
}


def status_for(exc: errors.PluginDError) -> int:
    """Return the HTTP status that answers `exc` (500 for anything unmapped)."""
    if isinstance(exc, ApiError):
        return exc.status
    if exc.code in _STATUS_BY_CODE:
        return _STATUS_BY_CODE[exc.code]
    for cls in type(exc).__mro__:
        if cls in _STATUS_BY_CLASS:
            return _STATUS_BY_CLASS[cls]
    return 500


def dumps(data: Any) -> str:
    """Encode a response body as compact JSON with ASCII escapes.

    A lone surrogate (from a non-UTF-8 directory name or a payload) must not make the UTF-8
    encoding of the response fail; NaN and infinities are refused.
    """
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def json_response(data: Any, status: int = 200) -> web.Response:
    """Return a JSON response."""
    return web.json_response(data, status=status, dumps=dumps)


def error_body(code: str, message: str) -> dict[str, Any]:
    """Return the error shape of INTERFACE §6."""
    return {"error": {"code": code, "message": message}, "detail": message}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Return a JSON error response with the given status, code and message."""
    return web.json_response(error_body(code, message), status=status, headers=headers, dumps=dumps)
