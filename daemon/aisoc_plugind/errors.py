"""Define the one exception tree of aisoc-plugind; every error carries a stable code.

    PluginDError                      code            http
    ├── ConfigError                   config_invalid  (startup only)
    ├── ManifestError                 manifest_*      422
    ├── BundleError                   bundle_*        422
    ├── SignatureRefused              signature_*     422
    ├── KeyFileError                  key_*           (a skipped key file)
    ├── PluginLoadError               plugin_import_failed / plugin_init_failed / ...  422
    ├── DuplicatePluginId             duplicate_id    409
    ├── PluginNotFound                plugin_not_found 404
    ├── PluginStateConflict           plugin_disabled / plugin_failed / plugin_unloaded  409
    ├── PluginRunError                plugin_error    502
    ├── PluginTimeout                 plugin_timeout  504
    ├── PluginResultInvalid           plugin_result_invalid 502
    ├── AuthoringError                authoring_failed (the `aisoc plugin` commands)
    └── OciError (daemon.oci)         oci_*           502;  ArchiveError archive_* 422

The `code` is what the API's error body, the audit log (`error_code`) and the CLI show;
`http_status` is the API's answer for it. Foreign exceptions are translated at the boundary
with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class PluginDError(Exception):
    """Root of every error the daemon raises on purpose."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def as_dict(self) -> dict[str, str]:
        """Return the `{"code", "message"}` shape used on records and in the API."""
        return {"code": self.code, "message": self.message}


class ConfigError(PluginDError):
    """The configuration cannot be used; the daemon refuses to start."""

    code = "config_invalid"
    http_status = 500


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
    http_status = 422

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
    http_status = 422


class SignatureRefused(PluginDError):
    """The trust mode refuses to load a plugin because of its signature status."""

    code = "signature_invalid"
    http_status = 422


class KeyFileError(PluginDError):
    """A trusted-key file is malformed or not Ed25519; it is skipped, never fatal."""

    code = "key_invalid"
    http_status = 422


class PluginLoadError(PluginDError):
    """The plugin's code would not import, construct or set up."""

    code = "plugin_import_failed"
    http_status = 422


class DuplicatePluginId(PluginDError):
    """Two directories declare the same manifest id; the first loaded wins."""

    code = "duplicate_id"
    http_status = 409


class PluginNotFound(PluginDError):
    """No plugin with that id is known."""

    code = "plugin_not_found"
    http_status = 404


class PluginStateConflict(PluginDError):
    """The operation is not allowed in the plugin's current state."""

    code = "plugin_state_conflict"
    http_status = 409


class PluginRunError(PluginDError):
    """The plugin raised while running."""

    code = "plugin_error"
    http_status = 502


class PluginTimeout(PluginDError):
    """The plugin did not return within `plugins.run_timeout_s`."""

    code = "plugin_timeout"
    http_status = 504


class PluginResultInvalid(PluginDError):
    """The plugin returned something that is not JSON-serialisable."""

    code = "plugin_result_invalid"
    http_status = 502


class AuthoringError(PluginDError):
    """An authoring command cannot do what was asked (file exists, plugin invalid, ...)."""

    code = "authoring_failed"
    http_status = 400
