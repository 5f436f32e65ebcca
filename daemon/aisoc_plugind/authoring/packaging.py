"""Build a plugin's reproducible package from a valid plugin directory."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aisoc_plugind.authoring.layout import packaged, read_file
from aisoc_plugind.authoring.validate import validate_plugin
from aisoc_plugind.core.manifest import Manifest
from aisoc_plugind.delivery.package import archive_members
from aisoc_plugind.delivery.package import build_package as build_archive
from aisoc_plugind.engine.bundle import (
    SIGNATURE_FILE,
)
from aisoc_plugind.errors import (
    AuthoringError,
)

__all__ = ["Package", "build_package", "source_date_epoch"]

_UNSAFE_NAME_CHARS_RE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Package:
    """A reproducible `.tar.gz` of a plugin, in memory."""

    manifest: Manifest
    data: bytes
    members: tuple[str, ...]
    signed: bool

    def default_name(self) -> str:
        """Return `<id>-<version>.tar.gz` (characters unsafe in a file name become `_`)."""
        version = _UNSAFE_NAME_CHARS_RE.sub("_", self.manifest.version)
        return f"{self.manifest.id}-{version}.tar.gz"


def build_package(plugin_dir: Path, *, mtime: int = 0) -> Package:
    """Archive a valid plugin under a top directory named by its id, byte-reproducibly.

    Entries are sorted; owners are 0/""; modes are 0644 (files) and 0755 (directories); every
    mtime is `mtime`; the gzip header has mtime 0 and no file name. `*.py` files hold exactly
    the bytes that were validated.
    """
    report = validate_plugin(plugin_dir)
    bundle, manifest = report.signed_parts()
    contents: dict[str, bytes] = {}
    for rel in packaged(report.tree):
        contents[rel] = bundle.sources[rel] if rel in bundle.sources else read_file(plugin_dir, rel)
    return Package(
        manifest=manifest,
        data=build_archive(manifest.id, contents, mtime=mtime),
        members=tuple(name for name, _ in archive_members(manifest.id, contents)),
        signed=SIGNATURE_FILE in contents,
    )


def source_date_epoch(environ: Mapping[str, str]) -> int:
    """Return SOURCE_DATE_EPOCH (reproducible-builds.org) or 0 when it is unset."""
    raw = environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()):
        raise AuthoringError(f"SOURCE_DATE_EPOCH must be a non-negative integer, not {raw!r}")
    return int(raw)
