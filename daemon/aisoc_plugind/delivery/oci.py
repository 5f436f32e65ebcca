"""Pull and push plugin packages stored as one-layer OCI artifacts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aisoc_plugind.delivery.artifact import (
    EMPTY_CONFIG,
    MEDIA_TYPE_LAYER,
    Descriptor,
    build_manifest,
    layer_descriptor,
    sha256_digest,
)
from aisoc_plugind.delivery.limits import DEFAULT_LIMITS, Deadline, Limits
from aisoc_plugind.delivery.package import Extracted, extract_package, inspect_package
from aisoc_plugind.delivery.reference import (
    Reference,
    bad_reference,
    check_policy,
    parse_reference,
)
from aisoc_plugind.delivery.registry import Registry, RegistryAccess
from aisoc_plugind.errors import OciError
from aisoc_plugind.files import FileRefused, read_regular

__all__ = ["Pulled", "pull_package", "push_package", "push_reference", "resolve_digest"]

PUSH_DEADLINE_S = 600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Pulled:
    """A verified package layer and the digest of the manifest that named it."""

    digest: str
    layer: bytes = field(repr=False)
    reference: Reference
    limits: Limits = field(default=DEFAULT_LIMITS, repr=False)

    @property
    def pinned(self) -> bool:
        """Return True when the reference named a digest (not only a movable tag)."""
        return self.reference.digest is not None

    def extract_into(self, staging: Path) -> Extracted:
        """Unpack the layer into the empty directory `staging` (see `extract_package`)."""
        return extract_package(self.layer, staging, limits=self.limits)


def pull_package(
    ref: str,
    *,
    insecure_registries: Sequence[str] = (),
    ca_file: Path | None = None,
    docker_config: Path | None = None,
    limits: Limits = DEFAULT_LIMITS,
    require_digest: bool = False,
    allowed_registries: Sequence[str] = (),
) -> Pulled:
    """Fetch and verify the package layer of `ref`; write nothing to disk.

    `require_digest` and `allowed_registries` refuse a reference before any request
    (`check_policy`: `oci_tag_not_pinned`, `oci_registry_not_allowed`). The manifest is read
    under a size cap, its digest computed from the bytes received (and matched against a
    digest reference), its shape checked; the one layer is streamed with its exact
    descriptor size and sha256 enforced. TLS trusts the system's roots plus `ca_file`;
    credentials come from `docker_config` (None: `$DOCKER_CONFIG/config.json`, else
    `~/.docker/config.json`). Raises OciError.
    """
    reference = parse_reference(ref)
    check_policy(reference, require_digest=require_digest, allowed_registries=allowed_registries)
    access = RegistryAccess(
        insecure_registries=tuple(insecure_registries), ca_file=ca_file, docker_config=docker_config
    )
    with Registry(reference, access, _pull_deadline(reference, limits)) as registry:
        raw, content_type, stated = registry.fetch_manifest(limits.manifest_bytes)
        digest = _manifest_digest(reference, raw, stated)
        layer = layer_descriptor(raw, content_type)
        data = registry.fetch_blob(layer, limits.layer_bytes)
    return Pulled(digest=digest, layer=data, reference=reference, limits=limits)


def resolve_digest(
    ref: str,
    *,
    insecure_registries: Sequence[str] = (),
    ca_file: Path | None = None,
    docker_config: Path | None = None,
    allowed_registries: Sequence[str] = (),
    limits: Limits = DEFAULT_LIMITS,
) -> str:
    """Return the digest of the manifest `ref` names now (one manifest request, no layer).

    The digest is computed from the bytes received, and the manifest must be a plugin
    package's (one layer of our media type): a tag moved to something else is refused here.
    TLS, credentials and `allowed_registries` as for `pull_package`. Raises OciError.
    """
    reference = parse_reference(ref)
    check_policy(reference, require_digest=False, allowed_registries=allowed_registries)
    access = RegistryAccess(
        insecure_registries=tuple(insecure_registries), ca_file=ca_file, docker_config=docker_config
    )
    with Registry(reference, access, _pull_deadline(reference, limits)) as registry:
        raw, content_type, stated = registry.fetch_manifest(limits.manifest_bytes)
    layer_descriptor(raw, content_type)
    return _manifest_digest(reference, raw, stated)


def _pull_deadline(reference: Reference, limits: Limits) -> Deadline:
    return Deadline(
        limits.deadline_s,
        lambda: OciError(
            f"pulling {reference} took longer than {limits.deadline_s:g} s", code="oci_timeout"
        ),
    )


def _manifest_digest(reference: Reference, raw: bytes, stated: str | None) -> str:
    digest = sha256_digest(raw)
    expected = reference.digest or (stated if stated and stated.startswith("sha256:") else None)
    if expected is not None and expected != digest:
        raise OciError(
            f"the manifest of {reference} has digest {digest}, expected {expected}",
            code="oci_digest_mismatch",
        )
    return digest


def push_package(
    file: Path,
    ref: str,
    *,
    insecure_registries: Sequence[str] = (),
    ca_file: Path | None = None,
    docker_config: Path | None = None,
) -> str:
    """Push a package as a one-layer OCI 1.1 artifact; return the manifest digest.

    The package is first unpacked into a temporary dir under the daemon's rules and its
    manifest parsed, so nothing the daemon would refuse is published. TLS and credentials
    as for `pull_package`.
    """
    reference = push_reference(ref)
    limits = Limits()
    data = _read_package(file, limits.layer_bytes)
    plugin = inspect_package(data, limits)
    layer = Descriptor(media_type=MEDIA_TYPE_LAYER, digest=sha256_digest(data), size=len(data))
    raw = build_manifest(layer, title=file.name, plugin_id=plugin.id, version=plugin.version)
    deadline = Deadline(
        PUSH_DEADLINE_S,
        lambda: OciError(
            f"pushing to {reference} took longer than {PUSH_DEADLINE_S:g} s", code="oci_timeout"
        ),
    )
    access = RegistryAccess(
        insecure_registries=tuple(insecure_registries), ca_file=ca_file, docker_config=docker_config
    )
    with Registry(reference, access, deadline, push=True) as registry:
        registry.upload_blob(EMPTY_CONFIG)
        registry.upload_blob(data)
        registry.put_manifest(raw, reference.target)
    return sha256_digest(raw)


def push_reference(ref: str) -> Reference:
    """Parse a reference to push to: it must name a tag, not a digest."""
    reference = parse_reference(ref)
    if reference.tag is None or reference.digest is not None:
        raise bad_reference(ref, "push to a tag (HOST/REPOSITORY:TAG), not a digest")
    return reference


def _read_package(file: Path, cap: int) -> bytes:
    try:
        return read_regular(file, cap=cap)
    except FileRefused as exc:
        code = "oci_too_large" if exc.reason == "too_large" else "oci_bad_artifact"
        raise OciError(f"{file} {exc.detail}", code=code) from exc
