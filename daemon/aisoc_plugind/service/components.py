"""List the parts that run inside the service: control API, watcher, follow, sd_notify."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aisoc_plugind.api.app import serve
from aisoc_plugind.engine.manager import PluginManager
from aisoc_plugind.service.daemon import Component, HangupHook, Service
from aisoc_plugind.service.follow import follow_component
from aisoc_plugind.service.sdnotify import sdnotify_component
from aisoc_plugind.service.watcher import watcher_component

__all__ = ["api_component", "default_components"]


@asynccontextmanager
async def api_component(
    service: Service, manager: PluginManager
) -> AsyncIterator[HangupHook | None]:
    """Service component: serve the control API; its SIGHUP hook re-reads the tokens file.

    At shutdown it stops accepting, then waits for the service's drain (runs in flight
    finish, or are cut and answered) before it closes the connections.
    """
    async with serve(
        settings=service.settings,
        events=service.events,
        manager=manager,
        ready=service.ready.is_set,
        drained=service.drained,
    ) as hangup:
        yield hangup


def default_components() -> list[Component]:
    """Return the service components of a production daemon, in start order.

    sd_notify comes last: it stops first (STOPPING=1 as shutdown begins) and its SIGHUP hook
    (READY=1) runs after the API has re-read the tokens.
    """
    return [api_component, watcher_component, follow_component, sdnotify_component]
