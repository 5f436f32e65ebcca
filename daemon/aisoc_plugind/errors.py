"""Define the one exception tree of aisoc-plugind; every error carries a stable code.

    PluginDError                      code
    ├── ConfigError                   config_invalid (startup, check-config)
    ├── ManifestError                 manifest_*
    ├── BundleError                   bundle_*, plugin_dir_missing, manifest_missing
    ├── SignatureRefused              signature_unsigned / signature_invalid / signature_revoked
    ├── VersionDowngrade              version_downgrade (a reload would lower the version)
    ├── RevocationFileError           revoked_file_* (the revocation list cannot be used)
    ├── KeyFileError                  key_* (a skipped trusted-key file)
    ├── PluginLoadError               plugin_import_failed / plugin_init_failed / ...
    ├── DuplicatePluginId             duplicate_id
    ├── PluginNotFound                plugin_not_found
    ├── PluginStateConflict           plugin_disabled / plugin_failed / plugin_unloaded / ...
    ├── PluginRunError                plugin_error
    ├── PluginTimeout                 plugin_timeout
    ├── PluginResultInvalid           plugin_result_invalid
    ├── AuthoringError                authoring_failed (the `aisoc plugin` commands)
    ├── TokenFileError                tokens_file_invalid (the `token` commands)
    ├── AuditUnavailable              audit_unavailable (a change or run could not be recorded)
    ├── DaemonStopping                daemon_stopping (a run refused or cut by the shutdown)
    ├── AlreadyRunning                already_running (another daemon uses this audit file)
    ├── SandboxError                  sandbox_* (a plugin host could not sandbox itself)
    └── OciError                      oci_*
        ├── OciReferenceError         oci_bad_reference (the caller's input)
        ├── OciPolicyError            oci_tag_not_pinned / oci_registry_not_allowed
        └── ArchiveError              archive_*

The `code` is what the API's error body, the audit log (`error_code`) and the CLI show. Which
HTTP status answers which error is the API's business (`aisoc_plugind.api.errors`). Foreign
exceptions are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "AlreadyRunning",
    "ArchiveError",
    "AuditUnavailable",
    "AuthoringError",
    "BundleError",
    "ConfigError",
    "DaemonStopping",
    "DuplicatePluginId",
    "KeyFileError",
    "ManifestError",
    "OciError",
    "OciPolicyError",
    "OciReferenceError",
    "PluginDError",
    "PluginLoadError",
    "PluginNotFound",
    "PluginResultInvalid",
    "PluginRunError",
    "PluginStateConflict",
    "PluginTimeout",
    "Problem",
    "RevocationFileError",
    "SandboxError",
    "SignatureRefused",
    "TokenFileError",
    "VersionDowngrade",
]


class PluginDError(Exception):
    """Root of every error the daemon raises on purpose."""

    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def as_dict(self) -> dict[str, str]:
        """Return the `{"code", "message"}` shape used on records and in the API."""
        return {"code": self.code, "message": self.message}


class ConfigError(PluginDError):
    """The configuration cannot be used; the daemon refuses to start.

    `problems` lists every problem found, each naming its TOML key (check-config prints one
    a line); the message joins them.
    """

    code = "config_invalid"

    def __init__(
        self, message: str, *, code: str | None = None, problems: Iterable[str] = ()
    ) -> None:
        super().__init__(message, code=code)
        self.problems = tuple(problems) or (message,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One thing wrong with a manifest or plugin layout."""

    field: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ManifestError(PluginDError):
    """A manifest is missing, unreadable or invalid; lists every problem found."""

    code = "manifest_invalid"

    def __init__(self, problems: Iterable[Problem], *, source: str = "manifest") -> None:
        self.problems = tuple(problems)
        text = "; ".join(str(p) for p in self.problems) or "invalid manifest"
        codes = {p.code for p in self.problems}
        # A single kind of problem gives its own code; several give the umbrella code.
        code = codes.pop() if len(codes) == 1 else "manifest_invalid"
        super().__init__(f"{source}: {text}", code=code)


class BundleError(PluginDError):
    """A plugin directory cannot be read safely (symlink, size cap, odd file type)."""

    code = "bundle_invalid"


class SignatureRefused(PluginDError):
    """The trust mode refuses to load a plugin because of its signature status."""

    code = "signature_invalid"


class VersionDowngrade(PluginDError):
    """A reload would lower the plugin's version (or change it to or from one that is not
    semantic versioning) and the operator did not ask for it (INTERFACE §10)."""

    code = "version_downgrade"


class RevocationFileError(PluginDError):
    """`trust.revoked_file` cannot be used; the last good revocation list stays in force.

    revoked_file_unreadable, revoked_file_unsafe (not a regular file, or writable by group or
    others), revoked_file_unparseable (not UTF-8 TOML), revoked_file_invalid (wrong keys or
    types).
    """

    code = "revoked_file_invalid"


class KeyFileError(PluginDError):
    """A trusted-key file is malformed or not Ed25519; it is skipped, never fatal.

    key_invalid, key_unreadable, key_symlink (a link out of the keys dir), key_file_insecure
    (writable by group or others, or owned by another unprivileged user),
    key_file_not_regular (a FIFO, socket, device or directory), key_duplicate_id; for the
    keys dir itself keys_dir_unreadable and keys_dir_insecure (then no key is trusted).
    """

    code = "key_invalid"


class PluginLoadError(PluginDError):
    """The plugin's code would not import, construct or set up."""

    code = "plugin_import_failed"


class DuplicatePluginId(PluginDError):
    """Two directories declare the same manifest id; the first loaded wins."""

    code = "duplicate_id"


class PluginNotFound(PluginDError):
    """No plugin with that id is known."""

    code = "plugin_not_found"


class PluginStateConflict(PluginDError):
    """The operation is not allowed in the plugin's current state."""

    code = "plugin_state_conflict"


class PluginRunError(PluginDError):
    """The plugin raised while running (or its host ended under the call).

    `fault` names the type of what the plugin raised, when known: events carry it instead
    of the message, which can quote the payload.
    """

    code = "plugin_error"

    def __init__(self, message: str, *, code: str | None = None, fault: str | None = None) -> None:
        super().__init__(message, code=code)
        self.fault = fault


class PluginTimeout(PluginDError):
    """The plugin did not return within `plugins.run_timeout_s`."""

    code = "plugin_timeout"


class PluginResultInvalid(PluginDError):
    """The plugin returned something that is not JSON-serialisable."""

    code = "plugin_result_invalid"


class AuthoringError(PluginDError):
    """An authoring command cannot do what was asked (file exists, plugin invalid, ...)."""

    code = "authoring_failed"


class TokenFileError(PluginDError):
    """The tokens file cannot be read, parsed or written (the `token` commands).

    tokens_file_invalid, tokens_file_insecure (writable by group or others, owned by another
    unprivileged user, or not a regular file: not trusted), tokens_file_unreadable.
    """

    code = "tokens_file_invalid"


class AuditUnavailable(PluginDError):
    """The audit file cannot be written, so a change or run is refused (or was undone)."""

    code = "audit_unavailable"


class DaemonStopping(PluginDError):
    """The daemon is shutting down: a run arrived too late, or was still running when the
    shutdown's drain period ended and was cut."""

    code = "daemon_stopping"


class AlreadyRunning(PluginDError):
    """Another daemon holds the instance lock of this configuration (its audit file); this
    one stops before touching anything."""

    code = "already_running"


class SandboxError(PluginDError):
    """A plugin host could not sandbox itself; no plugin code may run in it (codes `sandbox_*`).

    sandbox_landlock_unavailable (`isolation.landlock = "require"` on a kernel without it),
    sandbox_parent_gone (the supervisor died before the host was sandboxed),
    sandbox_policy_invalid (the requested policy is unsafe or malformed), sandbox_failed.
    """

    code = "sandbox_failed"


class OciError(PluginDError):
    """Pulling from or pushing to a registry failed (codes `oci_*`).

    oci_insecure_registry, oci_tls_error, oci_unreachable, oci_timeout, oci_not_found,
    oci_unauthorized, oci_forbidden, oci_registry_error, oci_bad_artifact, oci_too_large,
    oci_size_mismatch, oci_digest_mismatch, oci_staging_failed, oci_not_configured.
    """

    code = "oci_error"


class OciReferenceError(OciError):
    """An OCI reference is malformed: the caller's input, not a registry failure."""

    code = "oci_bad_reference"


class OciPolicyError(OciError):
    """The configuration refuses a reference (`oci.require_digest`, `oci.allowed_registries`).

    oci_tag_not_pinned (a tag while digests are required), oci_registry_not_allowed.
    """

    code = "oci_registry_not_allowed"


class ArchiveError(OciError):
    """A package archive breaks the extraction rules; nothing outside staging was touched.

    archive_corrupt, archive_link, archive_special_file, archive_path_invalid,
    archive_absolute_path, archive_path_traversal, archive_path_too_long, archive_duplicate,
    archive_too_large, archive_too_many_entries, archive_layout, archive_timeout.
    """

    code = "archive_invalid"
