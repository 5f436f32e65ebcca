"""The HTTP guards of the registry client: schemes, origins, timeouts, TLS roots."""

from __future__ import annotations

import ssl
import time

import httpx
import pytest

from aisoc_plugind.delivery.limits import Deadline
from aisoc_plugind.delivery.transport import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    check_scheme,
    origin,
    timeouts,
    tls_context,
)
from aisoc_plugind.errors import OciError


@pytest.mark.parametrize(
    ("url", "insecure", "code"),
    [
        ("https://reg.example/v2/", [], None),
        ("http://reg.example:5000/v2/", ["reg.example:5000"], None),
        ("http://REG.example:5000/v2/", ["reg.example:5000"], None),
        ("http://reg.example/v2/", ["reg.example:80"], None),
        ("http://reg.example/v2/", ["reg.example"], None),
        ("http://[::1]:5000/v2/", ["[::1]:5000"], None),
        ("http://reg.example:5000/v2/", [], "oci_insecure_registry"),
        ("http://reg.example:5001/v2/", ["reg.example:5000"], "oci_insecure_registry"),
        ("http://other.example:5000/", ["reg.example:5000"], "oci_insecure_registry"),
        ("ftp://reg.example/x", ["reg.example"], "oci_registry_error"),
    ],
)
def test_check_scheme(url: str, insecure: list[str], code: str | None) -> None:
    """https always; http only to a listed host:port; nothing else."""
    if code is None:
        check_scheme(httpx.URL(url), insecure)
        return
    with pytest.raises(OciError) as caught:
        check_scheme(httpx.URL(url), insecure)
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://Reg.Example/v2/", ("https", "reg.example", 443)),
        ("https://reg.example:443/x", ("https", "reg.example", 443)),
        ("http://reg.example/x", ("http", "reg.example", 80)),
        ("http://127.0.0.1:5000/x", ("http", "127.0.0.1", 5000)),
    ],
)
def test_origin(url: str, expected: tuple[str, str, int]) -> None:
    """Scheme, lowercased host and port (default filled in) identify an origin."""
    assert origin(httpx.URL(url)) == expected


def test_timeouts_never_outlast_the_deadline() -> None:
    """Each timeout is the smaller of its own and what is left of the deadline."""
    generous = timeouts(Deadline(1000, lambda: OciError("late", code="oci_timeout")))
    assert (generous.connect, generous.read) == (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    tight = timeouts(Deadline(0.5, lambda: OciError("late", code="oci_timeout")))
    assert tight.read is not None and tight.read <= 0.5
    spent = Deadline(0.01, lambda: OciError("late", code="oci_timeout"))
    time.sleep(0.02)
    with pytest.raises(OciError) as caught:
        timeouts(spent)
    assert caught.value.code == "oci_timeout"


def test_tls_context_verifies() -> None:
    """The context checks certificates and host names, TLS 1.2 at least."""
    context = tls_context(None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
