"""Declare every route once: method, path, handler, its one permission and its spec entry."""

from __future__ import annotations

from aisoc_plugind.api.context import (
    Route,
)
from aisoc_plugind.api.handlers import (
    disable_plugin,
    discover_plugins,
    enable_plugin,
    healthz,
    install_from_oci,
    list_plugins,
    metrics,
    openapi,
    readyz,
    reload_plugin,
    run_plugin,
    show_plugin,
    unload_plugin,
)
from aisoc_plugind.api.tokens import ADMIN, EXECUTE, READ

__all__ = ["ADMIN", "EXECUTE", "PREFIX", "READ", "ROUTES"]


PREFIX = "/api/v1/plugins"


_ID = f"{PREFIX}/{{id}}"


ROUTES: tuple[Route, ...] = (
    Route(
        method="GET",
        path=PREFIX,
        handler=list_plugins,
        permission=READ,
        summary="List plugins, optionally filtered",
        response="PluginList",
        errors=(400,),
        query=("plugin_type", "state"),
    ),
    Route(
        method="POST",
        path=f"{PREFIX}/discover",
        handler=discover_plugins,
        permission=ADMIN,
        summary="Scan the plugins directory now",
        response="DiscoverResult",
    ),
    Route(
        method="POST",
        path=f"{PREFIX}/install_from_oci",
        handler=install_from_oci,
        permission=ADMIN,
        summary="Install a plugin from an OCI registry",
        ok=201,
        response="InstallResult",
        body="InstallRequest",
        body_required=True,
        errors=(400, 403, 409, 413, 422, 501, 502),
    ),
    Route(
        method="GET",
        path=_ID,
        handler=show_plugin,
        permission=READ,
        summary="Show one plugin",
        response="Plugin",
        errors=(404,),
    ),
    Route(
        method="DELETE",
        path=_ID,
        handler=unload_plugin,
        permission=ADMIN,
        summary="Unload a plugin from memory (files stay on disk)",
        ok=204,
        errors=(404, 409),
    ),
    Route(
        method="POST",
        path=f"{_ID}/enable",
        handler=enable_plugin,
        permission=ADMIN,
        summary="Enable a plugin",
        response="Plugin",
        errors=(404, 409),
    ),
    Route(
        method="POST",
        path=f"{_ID}/disable",
        handler=disable_plugin,
        permission=ADMIN,
        summary="Disable a plugin (code stays loaded)",
        response="Plugin",
        errors=(404, 409),
    ),
    Route(
        method="POST",
        path=f"{_ID}/reload",
        handler=reload_plugin,
        permission=ADMIN,
        summary="Reload a plugin from disk; on failure the old version serves on",
        response="Plugin",
        body="ReloadRequest",
        errors=(400, 404, 409, 413),
    ),
    Route(
        method="POST",
        path=f"{_ID}/run",
        handler=run_plugin,
        permission=EXECUTE,
        summary="Run a plugin",
        response="RunResult",
        body="RunRequest",
        errors=(400, 404, 409, 413, 502, 504),
    ),
    Route(
        method="GET",
        path="/healthz",
        handler=healthz,
        permission=None,
        summary="Liveness: the daemon's state, plugin counts and audit health",
        response="Health",
    ),
    Route(
        method="GET",
        path="/readyz",
        handler=readyz,
        permission=None,
        summary="Readiness: 200 once started and while the audit file can be written",
        response="Health",
        errors=(503,),
    ),
    Route(
        method="GET",
        path="/metrics",
        handler=metrics,
        permission=READ,
        summary="Prometheus metrics",
    ),
    Route(
        method="GET",
        path="/api/v1/openapi.json",
        handler=openapi,
        permission=None,
        summary="This OpenAPI document",
    ),
)
