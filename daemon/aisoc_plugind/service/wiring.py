"""Build a plugin manager wired for this daemon: its plugin host and its OCI package fetcher."""

from __future__ import annotations

import functools

from aisoc_plugind.audit.log import EventLog
from aisoc_plugind.config.settings import Settings
from aisoc_plugind.delivery.oci import pull_package
from aisoc_plugind.engine.hosts import PluginHost
from aisoc_plugind.engine.hosts.inprocess import InProcessHost
from aisoc_plugind.engine.hosts.process import ProcessHost
from aisoc_plugind.engine.keyring import Keyring
from aisoc_plugind.engine.manager import PluginManager

__all__ = ["make_host", "make_manager"]


def make_manager(settings: Settings, events: EventLog, keyring: Keyring) -> PluginManager:
    """Return a manager with the plugin host `isolation.mode` asks for (sandboxed host
    processes, or the daemon itself) that installs from OCI registries as `settings` allow."""
    fetch = functools.partial(
        pull_package,
        insecure_registries=settings.oci_allow_insecure_registries,
        ca_file=settings.oci_ca_file,
        docker_config=settings.oci_docker_config,
        require_digest=settings.oci_require_digest,
        allowed_registries=settings.oci_allowed_registries,
    )
    return PluginManager(settings, events, keyring, host=make_host(settings, events), fetch=fetch)


def make_host(settings: Settings, events: EventLog) -> PluginHost:
    """Return the plugin host of `isolation.mode`."""
    if settings.isolation_mode == "none":
        return InProcessHost(
            timeout_s=settings.run_timeout_s,
            concurrency=settings.run_concurrency,
            max_result_bytes=settings.max_result_bytes,
        )
    protected = [
        settings.tokens_file,
        settings.audit_path,
        settings.keys_dir,
        settings.revoked_file,
        settings.state_dir / ".daemon",
        *([settings.config_file] if settings.config_file else []),
        *([settings.audit_signing_key] if settings.audit_signing_key else []),
    ]
    return ProcessHost(settings, events.emit, protected=protected)
