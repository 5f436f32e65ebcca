"""Parse OCI references that name their registry explicitly (pure; no network)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from aisoc_plugind.errors import OciPolicyError, OciReferenceError

__all__ = [
    "DIGEST_RE",
    "Reference",
    "allows_http",
    "bad_reference",
    "check_policy",
    "parse_reference",
    "pinned",
]

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"


_HOST_RE = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::(\d{{1,5}}))?$")


_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"


_REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")


_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


_REF_SHAPE = "HOST[:PORT]/REPOSITORY:TAG or HOST[:PORT]/REPOSITORY@sha256:<64 hex>"


@dataclass(frozen=True, slots=True, kw_only=True)
class Reference:
    """A parsed `host[:port]/repository(:tag|@sha256:...)` reference."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def target(self) -> str:
        """Return what goes after `/manifests/`: the digest when there is one, else the tag."""
        return self.digest or self.tag or ""

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        return out + (f"@{self.digest}" if self.digest else "")


def parse_reference(ref: str) -> Reference:
    """Parse an OCI reference that names its registry explicitly; raise `oci_bad_reference`."""
    if not ref or len(ref) > 1024 or ref != ref.strip() or any(c.isspace() for c in ref):
        raise bad_reference(ref, "it is empty, too long or holds whitespace")
    if "://" in ref:
        raise bad_reference(
            ref,
            "write it without a URL scheme; plain HTTP is allowed per "
            "registry with oci.allow_insecure_registries",
        )
    name, at, digest = ref.partition("@")
    host, slash, rest = name.partition("/")
    if not slash:
        raise bad_reference(ref, "it does not name a registry host and a repository")
    repository, tag = _split_tag(rest)
    _check_host(ref, host)
    _check_parts(ref, repository, tag, digest if at else None)
    return Reference(registry=host, repository=repository, tag=tag, digest=digest or None)


def _split_tag(rest: str) -> tuple[str, str | None]:
    head, slash, last = rest.rpartition("/")
    if ":" not in last:
        return rest, None
    last, _, tag = last.partition(":")
    return f"{head}{slash}{last}", tag


def _check_host(ref: str, host: str) -> None:
    match = _HOST_RE.match(host)
    if match is None:
        raise bad_reference(ref, f"{host!r} is not a registry host[:port]")
    if match.group(1) is not None and not 0 < int(match.group(1)) <= 65535:
        raise bad_reference(ref, f"{host!r} has a port out of range")
    # Like Docker: without a dot, a port or `localhost`, the first part would be a namespace.
    if not ("." in host or ":" in host or host.lower() == "localhost"):
        raise bad_reference(
            ref,
            f"{host!r} is not an explicit registry host (name one with a "
            "dot or a port, e.g. ghcr.io/... or 127.0.0.1:5000/...)",
        )


def _check_parts(ref: str, repository: str, tag: str | None, digest: str | None) -> None:
    if not _REPOSITORY_RE.match(repository) or len(repository) > 255:
        raise bad_reference(
            ref,
            f"{repository!r} is not a valid repository name (lowercase "
            "letters, digits and . _ - separators)",
        )
    if tag is not None and not _TAG_RE.match(tag):
        raise bad_reference(ref, f"{tag!r} is not a valid tag")
    if digest is not None and not DIGEST_RE.match(digest):
        raise bad_reference(ref, f"{digest!r} is not a sha256 digest (sha256:<64 hex>)")
    if tag is None and digest is None:
        raise bad_reference(ref, "name a tag or a digest; there is no default tag")


def bad_reference(ref: str, why: str) -> OciReferenceError:
    """Return the error for a malformed reference, saying why and what shape is expected."""
    return OciReferenceError(f"bad OCI reference {ref[:200]!r}: {why} (expected {_REF_SHAPE})")


def allows_http(registry: str, insecure_registries: Sequence[str]) -> bool:
    """Return True when `registry` is one of the registries allowed plain HTTP."""
    return registry.lower() in {r.strip().lower() for r in insecure_registries}


def pinned(reference: Reference, digest: str) -> Reference:
    """Return `reference` pinned to the manifest `digest` (its tag kept for the reader)."""
    return Reference(
        registry=reference.registry, repository=reference.repository, tag=None, digest=digest
    )


def check_policy(
    reference: Reference, *, require_digest: bool, allowed_registries: Sequence[str]
) -> None:
    """Refuse what the configuration does not allow, before any request is sent.

    A non-empty `allowed_registries` lists the registries (`host[:port]`, compared without
    case) that may be used; `require_digest` refuses a reference that names no digest.
    """
    allowed = {r.strip().lower() for r in allowed_registries if r.strip()}
    if allowed and reference.registry.lower() not in allowed:
        raise OciPolicyError(
            f"registry {reference.registry} is not in oci.allowed_registries "
            f"({', '.join(sorted(allowed))[:300]}); add it there to install from it",
            code="oci_registry_not_allowed",
        )
    if require_digest and reference.digest is None:
        raise OciPolicyError(
            f"{reference} names a tag, not a digest: a tag can be moved to other code. Pin it "
            f"as {reference.registry}/{reference.repository}@sha256:<digest> (`aisoc plugin "
            "push` prints the digest), or set oci.require_digest = false to install tags",
            code="oci_tag_not_pinned",
        )
