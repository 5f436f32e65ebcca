"""The delivery policy (pins, allowed registries) and tag resolution against a real registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from aisoc_plugind.delivery.oci import pull_package, resolve_digest
from aisoc_plugind.delivery.reference import check_policy, parse_reference, pinned
from aisoc_plugind.errors import OciError, OciPolicyError
from tests.delivery.pushes import push_plugin
from tests.oci_registry import (  # noqa: F401 - the fixture
    free_port,
    hermetic,  # autouse: no proxy, no Docker config
    oci_registry_fixture,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("ref", "require_digest", "allowed", "code"),
    [
        ("ghcr.io/org/p:1.0", False, (), None),
        (f"ghcr.io/org/p@{DIGEST}", True, (), None),
        ("ghcr.io/org/p:1.0", True, (), "oci_tag_not_pinned"),
        (f"ghcr.io/org/p:1.0@{DIGEST}", True, (), None),
        (f"ghcr.io/org/p@{DIGEST}", True, ("GHCR.IO",), None),
        (f"ghcr.io/org/p@{DIGEST}", True, ("quay.io", "ghcr.io:443"), "oci_registry_not_allowed"),
        ("ghcr.io/org/p:1.0", True, ("quay.io",), "oci_registry_not_allowed"),
        (f"127.0.0.1:5000/p@{DIGEST}", False, ("127.0.0.1:5000",), None),
        (f"127.0.0.1:5000/p@{DIGEST}", False, ("127.0.0.1",), "oci_registry_not_allowed"),
    ],
)
def test_check_policy(
    ref: str, require_digest: bool, allowed: tuple[str, ...], code: str | None
) -> None:
    """Registry allow-list first (exact host[:port], any case), then the pin requirement."""
    reference = parse_reference(ref)
    if code is None:
        check_policy(reference, require_digest=require_digest, allowed_registries=allowed)
        return
    with pytest.raises(OciPolicyError) as info:
        check_policy(reference, require_digest=require_digest, allowed_registries=allowed)
    assert info.value.code == code


def test_the_tag_refusal_names_the_setting_and_the_pinned_form() -> None:
    """The message says how to pin, and which setting allows tags."""
    with pytest.raises(OciPolicyError) as info:
        check_policy(
            parse_reference("ghcr.io/org/p:1.0"), require_digest=True, allowed_registries=()
        )
    assert "oci.require_digest = false" in info.value.message
    assert "ghcr.io/org/p@sha256:<digest>" in info.value.message


def test_pinned_keeps_registry_and_repository() -> None:
    """A tag reference pinned to a digest names that digest only."""
    ref = pinned(parse_reference("127.0.0.1:5000/aisoc/p:stable"), DIGEST)
    assert str(ref) == f"127.0.0.1:5000/aisoc/p@{DIGEST}"


def test_policy_is_checked_before_any_request() -> None:
    """A refused reference fails at once, even toward an address where nothing listens."""
    ref = f"127.0.0.1:{free_port()}/aisoc/p:1"
    with pytest.raises(OciPolicyError):
        pull_package(ref, require_digest=True)
    with pytest.raises(OciPolicyError):
        resolve_digest(ref, allowed_registries=("ghcr.io",))


@pytest.mark.oci
def test_resolve_digest_follows_the_tag(oci_registry: str, tmp_path: Path) -> None:
    """A tag resolves to the digest of what was pushed to it last."""
    first = push_plugin(oci_registry, tmp_path, "resolve", "stable", version="1.0.0")
    tag = f"{oci_registry}/aisoc/resolve:stable"
    insecure = [oci_registry]
    assert resolve_digest(tag, insecure_registries=insecure) == first.partition("@")[2]
    second = push_plugin(oci_registry, tmp_path, "resolve", "stable", version="2.0.0")
    assert resolve_digest(tag, insecure_registries=insecure) == second.partition("@")[2]


@pytest.mark.oci
def test_pulled_packages_say_whether_they_were_pinned(oci_registry: str, tmp_path: Path) -> None:
    """Pulled.pinned is true for a digest reference only."""
    ref = push_plugin(oci_registry, tmp_path, "pinned-flag", "1.0.0")
    insecure = [oci_registry]
    assert pull_package(ref, insecure_registries=insecure).pinned
    tag = f"{oci_registry}/aisoc/pinned-flag:1.0.0"
    assert not pull_package(tag, insecure_registries=insecure).pinned


def test_resolving_an_unreachable_registry_is_a_coded_error() -> None:
    """Nothing listening: oci_unreachable (what follow reports and backs off on)."""
    ref = f"127.0.0.1:{free_port()}/aisoc/p:stable"
    with pytest.raises(OciError) as info:
        resolve_digest(ref, insecure_registries=[ref.partition("/")[0]])
    assert info.value.code == "oci_unreachable"
