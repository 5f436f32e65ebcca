"""Name every event the daemon writes (INTERFACE §7-§10): dotted names, one constant each.

Nothing else in the code spells an event name: emitters, metrics and tests use these.
"""

from __future__ import annotations

__all__ = [
    "ALL",
    "API_CONNECTIONS_LIMITED",
    "API_DENIED",
    "API_ERROR",
    "API_LISTENING",
    "API_REQUEST",
    "API_TOKENS_LOADED",
    "API_TOKENS_REFUSED",
    "AUDIT_CHECKPOINT",
    "AUDIT_GAP",
    "AUDIT_REOPENED",
    "AUDIT_WRITE_FAILED",
    "CONFIG_WARNING",
    "DAEMON_READY",
    "DAEMON_RELOADING",
    "DAEMON_STARTED",
    "DAEMON_STOPPED",
    "DAEMON_STOPPING",
    "KEYS_CHANGED",
    "KEY_SKIPPED",
    "LOG_RECORD",
    "PLUGIN_CHANGE_ABORTED",
    "PLUGIN_DISABLED",
    "PLUGIN_DISCOVERED",
    "PLUGIN_DUPLICATE_ID",
    "PLUGIN_ENABLED",
    "PLUGIN_FOLLOW_FAILED",
    "PLUGIN_FOLLOW_UPDATED",
    "PLUGIN_HOST_EXITED",
    "PLUGIN_HOST_RESTARTING",
    "PLUGIN_HOST_STARTED",
    "PLUGIN_INSTALL_COMPLETED",
    "PLUGIN_INSTALL_FAILED",
    "PLUGIN_INSTALL_UNPINNED",
    "PLUGIN_LOADED",
    "PLUGIN_LOAD_FAILED",
    "PLUGIN_LOAD_RETRYING",
    "PLUGIN_PATH_MISSING",
    "PLUGIN_RELOAD_COMPLETED",
    "PLUGIN_RELOAD_FAILED",
    "PLUGIN_REVOKED",
    "PLUGIN_RUN_COMPLETED",
    "PLUGIN_RUN_FAILED",
    "PLUGIN_SIGNATURE_INVALID",
    "PLUGIN_SIGNATURE_SKIPPED",
    "PLUGIN_SIGNATURE_UNSIGNED",
    "PLUGIN_SIGNATURE_VERIFIED",
    "PLUGIN_TEARDOWN_FAILED",
    "PLUGIN_UNLOADED",
    "PLUGIN_VERSION_DOWNGRADED",
    "REVOCATIONS_CHANGED",
    "REVOCATIONS_FAILED",
    "WATCHER_ERROR",
    "WATCHER_STARTED",
    "WATCHER_STOPPED",
]

# The daemon's own run.
DAEMON_STARTED = "daemon.started"
DAEMON_READY = "daemon.ready"
DAEMON_RELOADING = "daemon.reloading"
DAEMON_STOPPING = "daemon.stopping"
DAEMON_STOPPED = "daemon.stopped"
CONFIG_WARNING = "config.warning"

# Trust material.
KEY_SKIPPED = "trust.key.skipped"
KEYS_CHANGED = "trust.keys.changed"
# The revocation list (`trust.revoked_file`): adopted, or refused (the last good one stays).
REVOCATIONS_CHANGED = "trust.revocations.changed"
REVOCATIONS_FAILED = "trust.revocations.failed"

# The audit file itself (the writer's own records carry no `seq`).
AUDIT_REOPENED = "audit.reopened"
AUDIT_WRITE_FAILED = "audit.write_failed"
AUDIT_GAP = "audit.gap"
AUDIT_CHECKPOINT = "audit.checkpoint"

# Library log records (aiohttp, asyncio, ...) as events: stdout only, never the audit file.
LOG_RECORD = "log.record"

# Plugins: lifecycle transitions and trust decisions.
PLUGIN_DISCOVERED = "plugin.discovered"
PLUGIN_LOADED = "plugin.loaded"
PLUGIN_ENABLED = "plugin.enabled"
PLUGIN_DISABLED = "plugin.disabled"
PLUGIN_UNLOADED = "plugin.unloaded"
PLUGIN_LOAD_FAILED = "plugin.load.failed"
# A load that failed on a transient resource error (EMFILE, ENOMEM, ...) is tried again.
PLUGIN_LOAD_RETRYING = "plugin.load.retrying"
PLUGIN_SIGNATURE_VERIFIED = "plugin.signature.verified"
PLUGIN_SIGNATURE_INVALID = "plugin.signature.invalid"
PLUGIN_SIGNATURE_UNSIGNED = "plugin.signature.unsigned"
PLUGIN_SIGNATURE_SKIPPED = "plugin.signature.skipped"
PLUGIN_DUPLICATE_ID = "plugin.duplicate_id"
PLUGIN_PATH_MISSING = "plugin.path.missing"
PLUGIN_RELOAD_COMPLETED = "plugin.reload.completed"
PLUGIN_RELOAD_FAILED = "plugin.reload.failed"
PLUGIN_RUN_COMPLETED = "plugin.run.completed"
PLUGIN_RUN_FAILED = "plugin.run.failed"
PLUGIN_TEARDOWN_FAILED = "plugin.teardown.failed"
PLUGIN_INSTALL_COMPLETED = "plugin.install.completed"
PLUGIN_INSTALL_FAILED = "plugin.install.failed"
# A change whose events could not be made durable was not made (or was undone).
PLUGIN_CHANGE_ABORTED = "plugin.change.aborted"
# Trust over time and delivery (INTERFACE §10).
PLUGIN_REVOKED = "plugin.revoked"
PLUGIN_VERSION_DOWNGRADED = "plugin.version.downgraded"
PLUGIN_INSTALL_UNPINNED = "plugin.install.unpinned"
PLUGIN_FOLLOW_UPDATED = "plugin.follow.updated"
PLUGIN_FOLLOW_FAILED = "plugin.follow.failed"

# Plugin host processes (INTERFACE §8).
PLUGIN_HOST_STARTED = "plugin.host.started"
PLUGIN_HOST_EXITED = "plugin.host.exited"
PLUGIN_HOST_RESTARTING = "plugin.host.restarting"

# The control API.
API_REQUEST = "api.request"
API_DENIED = "api.denied"
API_ERROR = "api.error"
API_LISTENING = "api.listening"
API_TOKENS_LOADED = "api.tokens.loaded"
# The tokens file may not be trusted (mode, owner, type): the tokens before stay in force.
API_TOKENS_REFUSED = "api.tokens.refused"
# A connection was closed or refused to keep connections bounded (rate-limited).
API_CONNECTIONS_LIMITED = "api.connections.limited"

# The plugins-directory watcher.
WATCHER_STARTED = "watcher.started"
WATCHER_ERROR = "watcher.error"
WATCHER_STOPPED = "watcher.stopped"

ALL = frozenset(
    value for name, value in dict(globals()).items() if name.isupper() and isinstance(value, str)
)
