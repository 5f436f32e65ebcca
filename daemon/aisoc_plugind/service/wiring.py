"""Build a plugin manager wired for this daemon: its plugin host and its OCI package fetcher."""

from __future__ import annotations

import functools

from aisoc_plugind.audit.log import EventLog
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.delivery.oci import pull_package
from aisoc_plugind.engine.keyring import Keyring
from aisoc_plugind.engine.manager import PluginManager

__all__ = ["make_manager"]


def make_manager(settings: Settings, events: EventLog, keyring: Keyring) -> PluginManager:
    """Return a manager that installs from OCI registries as `settings` allow."""
    fetch = functools.partial(
        pull_package,
        insecure_registries=settings.oci_allow_insecure_registries,
        ca_file=settings.oci_ca_file,
        docker_config=settings.oci_docker_config,
    )
    return PluginManager(settings, events, keyring, fetch=fetch)
