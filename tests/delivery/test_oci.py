"""OCI pull and push against a real registry (docker-registry on loopback), plus a lying one."""

from __future__ import annotations

import base64
import gzip
import json
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from aisoc_plugind.api.errors import status_for
from aisoc_plugind.cli.main import run_aisoc
from aisoc_plugind.delivery import artifact as oci
from aisoc_plugind.delivery import oci as oci_client
from aisoc_plugind.delivery.artifact import ARTIFACT_TYPE, MEDIA_TYPE_LAYER
from aisoc_plugind.delivery.limits import Limits
from aisoc_plugind.delivery.oci import pull_package, push_package
from aisoc_plugind.delivery.package import extract_package
from aisoc_plugind.delivery.reference import parse_reference
from aisoc_plugind.errors import OciError, PluginDError
from tests.conftest import Env, ManagerFactory, PluginFactory, sign_dir
from tests.delivery.fake_registry import (  # noqa: F401 - the fixture
    Route,
    Routes,
    liar_fixture,
    serve_package,
    sha,
)
from tests.oci_registry import (  # noqa: F401 - the fixture
    free_port,
    hermetic,  # autouse: no proxy, no Docker config
    oci_registry_fixture,
)

PLUGIN_ID = "test.oci-demo"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def build_package(
    root: Path,
    *,
    plugin_id: str = PLUGIN_ID,
    top: str | None = None,
    version: str = "1.2.0",
    extra: list[tarfile.TarInfo] | None = None,
) -> Path:
    """Write a signed plugin dir and tar it like `aisoc plugin package` (top dir = id)."""
    plugin_dir = PluginFactory(root / "src").write("demo", plugin_id=plugin_id, version=version)
    sign_dir(plugin_dir)
    out = root / f"{plugin_id}-{version}.tar.gz"
    top = top or plugin_id
    with tarfile.open(out, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.add(plugin_dir, arcname=top, recursive=False)
        for name in ("plugin.yaml", "plugin.py", "plugin.sig"):
            tar.add(plugin_dir / name, arcname=f"{top}/{name}")
        for info in extra or []:
            tar.addfile(info)
    return out


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return build_package(tmp_path)


# ---- raw registry access for crafted manifests -------------------------------------------


def http(
    method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with _DIRECT.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def upload_blob(host: str, repo: str, data: bytes) -> str:
    status, headers, _ = http("POST", f"http://{host}/v2/{repo}/blobs/uploads/", b"")
    assert status == 202
    location = headers["Location"]
    sep = "&" if "?" in location else "?"
    status, _, _ = http(
        "PUT",
        f"{location}{sep}digest={sha(data)}",
        data,
        {"Content-Type": "application/octet-stream"},
    )
    assert status == 201
    return sha(data)


def put_manifest(
    host: str, repo: str, tag: str, doc: dict[str, Any], media_type: str = oci.OCI_MANIFEST
) -> str:
    raw = json.dumps(doc).encode()
    status, _, body = http(
        "PUT", f"http://{host}/v2/{repo}/manifests/{tag}", raw, {"Content-Type": media_type}
    )
    assert status == 201, body
    return sha(raw)


def artifact(
    host: str,
    repo: str,
    layers: list[tuple[str, bytes]],
    *,
    artifact_type: str | None = ARTIFACT_TYPE,
) -> dict[str, Any]:
    """Upload blobs and return a manifest dict naming them (not yet pushed)."""
    config = upload_blob(host, repo, b"{}")
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_EMPTY, "digest": config, "size": 2},
        "layers": [
            {"mediaType": media_type, "digest": upload_blob(host, repo, data), "size": len(data)}
            for media_type, data in layers
        ],
    }
    if artifact_type is not None:
        doc["artifactType"] = artifact_type
    return doc


def pull(host: str, ref: str, **kwargs: Any) -> oci_client.Pulled:
    return pull_package(f"{host}/{ref}", insecure_registries=[host], **kwargs)


# ---- references (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("127.0.0.1:5000/aisoc/shodan:1.2.0", ("127.0.0.1:5000", "aisoc/shodan", "1.2.0", None)),
        ("ghcr.io/org/x@sha256:" + "a" * 64, ("ghcr.io", "org/x", None, "sha256:" + "a" * 64)),
        ("localhost/x:v1", ("localhost", "x", "v1", None)),
        ("[::1]:5000/a/b_c.d-e:latest", ("[::1]:5000", "a/b_c.d-e", "latest", None)),
        (
            "reg.example.org/a:t@sha256:" + "0" * 64,
            ("reg.example.org", "a", "t", "sha256:" + "0" * 64),
        ),
    ],
)
def test_parse_reference_accepts(ref: str, expected: tuple[Any, ...]) -> None:
    """Registry, repository, tag and digest come apart as written."""
    r = parse_reference(ref)
    assert (r.registry, r.repository, r.tag, r.digest) == expected


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "aisoc/shodan:1.2.0",
        "shodan:1.2.0",
        "myhost/shodan:1",
        "ghcr.io/org/x",
        "https://ghcr.io/org/x:1",
        "ghcr.io/Org/x:1",
        "ghcr.io/org/x:bad tag",
        " ghcr.io/o/x:1",
        "ghcr.io/org/x@sha256:abc",
        "ghcr.io/org/x@sha512:" + "a" * 128,
        "ghcr.io:99999/x:1",
        "ghcr.io//x:1",
        "ghcr.io/x/../y:1",
        "ghcr.io/x:" + "t" * 129,
        "-bad.io/x:1",
    ],
)
def test_parse_reference_refuses(ref: str) -> None:
    """No default registry, no default tag, no scheme, no malformed part."""
    with pytest.raises(OciError) as caught:
        parse_reference(ref)
    assert caught.value.code == "oci_bad_reference"
    assert status_for(caught.value) == 422


def _manifest(**changes: Any) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": oci.OCI_EMPTY, "digest": sha(b"{}"), "size": 2},
        "layers": [{"mediaType": MEDIA_TYPE_LAYER, "digest": sha(b"x"), "size": 1}],
    }
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


LAYER = {"mediaType": MEDIA_TYPE_LAYER, "digest": sha(b"x"), "size": 1}


@pytest.mark.parametrize(
    ("raw", "content_type", "why"),
    [
        (b"[]", None, "not a JSON object"),
        (b"\xff", None, "not valid JSON"),
        (b'{"a": NaN}', None, "not valid JSON"),
        (_manifest(schemaVersion=1), None, "not an OCI image manifest"),
        (_manifest(mediaType=None), "application/json", "not an OCI image manifest"),
        (
            _manifest(mediaType="application/vnd.docker.distribution.manifest.v2+json"),
            None,
            "not an OCI image manifest",
        ),
        (_manifest(config=None), None, "config descriptor is not an object"),
        (_manifest(layers="x"), None, "no layers"),
        (_manifest(layers=[[]]), None, "layer descriptor is not an object"),
        (_manifest(layers=[{**LAYER, "digest": 5}]), None, "lacks a mediaType or a digest"),
        (_manifest(layers=[{**LAYER, "digest": "md5:abc"}]), None, "is not sha256"),
        (_manifest(layers=[{**LAYER, "size": -1}]), None, "not a non-negative integer"),
        (_manifest(layers=[{**LAYER, "size": True}]), None, "not a non-negative integer"),
    ],
)
def test_layer_descriptor_refuses(raw: bytes, content_type: str | None, why: str) -> None:
    """Each malformed manifest shape is `oci_bad_artifact` with its reason."""
    with pytest.raises(OciError) as caught:
        oci.layer_descriptor(raw, content_type)
    assert caught.value.code == "oci_bad_artifact"
    assert why in caught.value.message


def test_layer_descriptor_uses_content_type_without_media_type() -> None:
    """An OCI manifest without a `mediaType` field is typed by its Content-Type."""
    layer = oci.layer_descriptor(_manifest(mediaType=None), f"{oci.OCI_MANIFEST}; q=1")
    assert (layer.digest, layer.size) == (sha(b"x"), 1)


# ---- push and pull against the real registry ---------------------------------------------


@pytest.mark.oci
def test_push_then_pull_by_tag_and_digest(oci_registry: str, package: Path) -> None:
    """The pulled layer is byte-identical to the file and the digests agree."""
    digest = push_package(
        package, f"{oci_registry}/aisoc/demo:1.2.0", insecure_registries=[oci_registry]
    )
    by_tag = pull(oci_registry, "aisoc/demo:1.2.0")
    by_digest = pull(oci_registry, f"aisoc/demo@{digest}")
    assert by_tag.layer == by_digest.layer == package.read_bytes()
    assert by_tag.digest == by_digest.digest == digest
    assert by_digest.reference.digest == digest


@pytest.mark.oci
def test_pushed_manifest_is_an_oci_11_artifact(oci_registry: str, package: Path) -> None:
    """artifactType, empty config, one titled layer, id/version annotations."""
    digest = push_package(
        package, f"{oci_registry}/aisoc/shape:1", insecure_registries=[oci_registry]
    )
    status, _, raw = http(
        "GET",
        f"http://{oci_registry}/v2/aisoc/shape/manifests/1",
        headers={"Accept": oci.OCI_MANIFEST},
    )
    assert status == 200
    assert sha(raw) == digest
    doc = json.loads(raw)
    assert doc["artifactType"] == ARTIFACT_TYPE
    assert doc["config"] == {"mediaType": oci.OCI_EMPTY, "digest": sha(b"{}"), "size": 2}
    [layer] = doc["layers"]
    assert layer["mediaType"] == MEDIA_TYPE_LAYER
    assert layer["size"] == package.stat().st_size
    assert layer["annotations"] == {oci.ANNOTATION_TITLE: package.name}
    assert doc["annotations"][oci.ANNOTATION_PLUGIN_ID] == PLUGIN_ID
    assert doc["annotations"][oci.ANNOTATION_PLUGIN_VERSION] == "1.2.0"


@pytest.mark.oci
def test_pulled_layer_extracts_to_the_signed_plugin(
    oci_registry: str, package: Path, tmp_path: Path
) -> None:
    """Pull then extract gives the package's files, plugin.sig included."""
    push_package(package, f"{oci_registry}/aisoc/extract:1", insecure_registries=[oci_registry])
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)
    extract_package(pull(oci_registry, "aisoc/extract:1").layer, staging)
    assert sorted(p.name for p in staging.iterdir()) == ["plugin.py", "plugin.sig", "plugin.yaml"]


@pytest.mark.oci
def test_pushing_twice_reuses_blobs(oci_registry: str, package: Path) -> None:
    """A second push of the same file gives the same digest (blobs already there)."""
    ref = f"{oci_registry}/aisoc/twice:1"
    assert push_package(package, ref, insecure_registries=[oci_registry]) == push_package(
        package, ref, insecure_registries=[oci_registry]
    )


@pytest.mark.oci
def test_unknown_tag_is_not_found(oci_registry: str) -> None:
    """A tag or repository the registry lacks is `oci_not_found`."""
    for ref in ("aisoc/demo:no-such-tag", "aisoc/no-such-repo:1"):
        with pytest.raises(OciError) as caught:
            pull(oci_registry, ref)
        assert caught.value.code == "oci_not_found"
        assert "MANIFEST_UNKNOWN" in caught.value.message or "NAME_UNKNOWN" in caught.value.message


@pytest.mark.oci
def test_unknown_digest_is_not_found(oci_registry: str) -> None:
    """A digest the registry does not hold is `oci_not_found`, never a guess."""
    with pytest.raises(OciError) as caught:
        pull(oci_registry, f"aisoc/demo@sha256:{'0' * 64}")
    assert caught.value.code == "oci_not_found"


@pytest.mark.oci
def test_plain_http_registry_needs_allow_listing(oci_registry: str) -> None:
    """Without the host in insecure_registries we speak TLS, and a plain-HTTP one is refused."""
    with pytest.raises(OciError) as caught:
        pull_package(f"{oci_registry}/aisoc/demo:1.2.0")
    assert caught.value.code == "oci_insecure_registry"
    with pytest.raises(OciError) as caught:
        pull_package(f"{oci_registry}/aisoc/demo:1.2.0", insecure_registries=["other:5000"])
    assert caught.value.code == "oci_insecure_registry"


@pytest.mark.oci
@pytest.mark.parametrize(
    ("layers", "artifact_type", "why"),
    [
        ([(MEDIA_TYPE_LAYER, b"a"), (MEDIA_TYPE_LAYER, b"b")], ARTIFACT_TYPE, "2 layers"),
        ([], ARTIFACT_TYPE, "0 layers"),
        ([("application/vnd.oci.image.layer.v1.tar+gzip", b"a")], None, "its layer is"),
        ([(MEDIA_TYPE_LAYER, b"a")], "application/vnd.example.other", "artifactType"),
    ],
)
def test_foreign_artifacts_are_refused(
    oci_registry: str, layers: list[tuple[str, bytes]], artifact_type: str | None, why: str
) -> None:
    """Only one layer of our media type, under our artifactType (or none), is accepted."""
    doc = artifact(oci_registry, "aisoc/foreign", layers, artifact_type=artifact_type)
    put_manifest(oci_registry, "aisoc/foreign", "bad", doc)
    with pytest.raises(OciError) as caught:
        pull(oci_registry, "aisoc/foreign:bad")
    assert caught.value.code == "oci_bad_artifact"
    assert why in caught.value.message


@pytest.mark.oci
def test_plain_image_manifest_with_our_layer_is_accepted(oci_registry: str, package: Path) -> None:
    """No artifactType (OCI 1.0 style) is fine when the single layer is ours."""
    data = package.read_bytes()
    put_manifest(
        oci_registry,
        "aisoc/plain",
        "1",
        artifact(oci_registry, "aisoc/plain", [(MEDIA_TYPE_LAYER, data)], artifact_type=None),
    )
    assert pull(oci_registry, "aisoc/plain:1").layer == data


@pytest.mark.oci
def test_image_index_is_refused(oci_registry: str, package: Path) -> None:
    """A multi-manifest index is not a package."""
    inner = artifact(oci_registry, "aisoc/index", [(MEDIA_TYPE_LAYER, package.read_bytes())])
    digest = put_manifest(oci_registry, "aisoc/index", "inner", inner)
    size = len(json.dumps(inner).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_INDEX,
        "manifests": [{"mediaType": oci.OCI_MANIFEST, "digest": digest, "size": size}],
    }
    put_manifest(oci_registry, "aisoc/index", "idx", index, oci.OCI_INDEX)
    with pytest.raises(OciError) as caught:
        pull(oci_registry, "aisoc/index:idx")
    assert caught.value.code == "oci_bad_artifact"
    assert "index" in caught.value.message


@pytest.mark.oci
@pytest.mark.parametrize("delta", [-1, 1])
def test_blob_size_must_equal_the_descriptor(oci_registry: str, delta: int) -> None:
    """A descriptor one byte short or long of the blob is refused."""
    doc = artifact(oci_registry, "aisoc/size", [(MEDIA_TYPE_LAYER, b"0123456789")])
    doc["layers"][0]["size"] += delta
    put_manifest(oci_registry, "aisoc/size", f"d{delta + 1}", doc)
    with pytest.raises(OciError) as caught:
        pull(oci_registry, f"aisoc/size:d{delta + 1}")
    assert caught.value.code == "oci_size_mismatch"


@pytest.mark.oci
def test_layer_and_manifest_caps(oci_registry: str, package: Path) -> None:
    """A layer over `layer_bytes` is refused before download; a manifest over its cap too."""
    push_package(package, f"{oci_registry}/aisoc/caps:1", insecure_registries=[oci_registry])
    with pytest.raises(OciError) as caught:
        pull(oci_registry, "aisoc/caps:1", limits=Limits(layer_bytes=100))
    assert caught.value.code == "oci_too_large"
    with pytest.raises(OciError) as caught:
        pull(oci_registry, "aisoc/caps:1", limits=Limits(manifest_bytes=100))
    assert caught.value.code == "oci_too_large"


def test_unreachable_registry_fails_fast() -> None:
    """Nothing listening: `oci_unreachable` at once, no retries with sleeps."""
    host = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(OciError) as caught:
        pull_package(f"{host}/aisoc/x:1", insecure_registries=[host])
    assert caught.value.code == "oci_unreachable"
    assert time.monotonic() - started < 5


# ---- a registry that lies ----------------------------------------------------------------


def test_liar_baseline_pull_works(liar: tuple[str, Routes]) -> None:
    """The fake serves a valid package correctly (so the failures below are real)."""
    host, routes = liar
    serve_package(routes, b"layer-bytes")
    assert pull(host, "aisoc/x:1").layer == b"layer-bytes"


def test_registry_token_auth_is_answered(liar: tuple[str, Routes]) -> None:
    """A Bearer challenge is answered with an anonymous token from its realm."""
    host, routes = liar
    serve_package(routes, b"layer")
    for route in routes.values():
        route.auth = "Bearer tok-123"
    routes.challenge = (
        f'Bearer realm="http://{host}/token",service="test",scope="repository:aisoc/x:pull"'
    )
    routes["/token"] = Route(json.dumps({"token": "tok-123"}).encode())
    assert pull(host, "aisoc/x:1").layer == b"layer"


def test_basic_auth_from_docker_config(liar: tuple[str, Routes], tmp_path: Path) -> None:
    """A Basic challenge is answered with the credentials of ~/.docker/config.json."""
    host, routes = liar
    secret = base64.b64encode(b"robot:s3cret").decode()
    config = tmp_path / "home" / ".docker" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"auths": {host: {"auth": secret}}}))
    serve_package(routes, b"layer")
    for route in routes.values():
        route.auth = f"Basic {secret}"
    routes.challenge = 'Basic realm="registry"'
    assert pull(host, "aisoc/x:1").layer == b"layer"


def test_refused_credentials_are_unauthorized(liar: tuple[str, Routes]) -> None:
    """No token to be had: `oci_unauthorized`, after one bounded attempt."""
    host, routes = liar
    serve_package(routes, b"layer")
    for route in routes.values():
        route.auth = "Bearer never"
    routes.challenge = f'Bearer realm="http://{host}/token",service="test"'
    routes["/token"] = Route(b"{}", status=401)
    with pytest.raises(OciError) as caught:
        pull(host, "aisoc/x:1")
    assert caught.value.code == "oci_unauthorized"


def test_manifest_not_matching_the_requested_digest(liar: tuple[str, Routes]) -> None:
    """Pulling `@sha256:X` and receiving other bytes is `oci_digest_mismatch`."""
    host, routes = liar
    wanted = "sha256:" + "ab" * 32
    serve_package(routes, b"layer", ref=wanted)
    with pytest.raises(OciError) as caught:
        pull(host, f"aisoc/x@{wanted}")
    assert caught.value.code == "oci_digest_mismatch"


def test_manifest_not_matching_the_stated_digest(liar: tuple[str, Routes]) -> None:
    """A Docker-Content-Digest header that disagrees with the bytes is refused."""
    host, routes = liar
    serve_package(routes, b"layer")
    routes["/v2/aisoc/x/manifests/1"].headers["Docker-Content-Digest"] = sha(b"other")
    with pytest.raises(OciError) as caught:
        pull(host, "aisoc/x:1")
    assert caught.value.code == "oci_digest_mismatch"


def test_layer_content_not_matching_its_digest(liar: tuple[str, Routes]) -> None:
    """Right size, wrong bytes: `oci_digest_mismatch`."""
    host, routes = liar
    serve_package(routes, b"genuine", blob=Route(b"forgery"))
    with pytest.raises(OciError) as caught:
        pull(host, "aisoc/x:1")
    assert caught.value.code == "oci_digest_mismatch"


@pytest.mark.parametrize("body", [b"0123456789-trailing", b"01234"])
def test_blob_without_length_must_still_match_size(liar: tuple[str, Routes], body: bytes) -> None:
    """With no Content-Length, extra (trailing) or missing bytes are caught while streaming."""
    host, routes = liar
    serve_package(routes, b"0123456789", blob=Route(body, length=False))
    with pytest.raises(OciError) as caught:
        pull(host, "aisoc/x:1")
    assert caught.value.code == "oci_size_mismatch"


def test_content_encoding_is_refused(liar: tuple[str, Routes]) -> None:
    """A gzip Content-Encoding (an HTTP-level bomb) is not decoded."""
    host, routes = liar
    layer = b"x" * 100
    serve_package(routes, layer, blob=Route(gzip.compress(layer), {"Content-Encoding": "gzip"}))
    with pytest.raises(OciError) as caught:
        pull(host, "aisoc/x:1")
    assert caught.value.code == "oci_registry_error"


def test_endless_manifest_is_cut_at_the_cap(liar: tuple[str, Routes]) -> None:
    """A manifest without Content-Length is read only up to `manifest_bytes`."""
    host, routes = liar
    routes["/v2/aisoc/x/manifests/1"] = Route(b" " * (64 << 10), length=False)
    with pytest.raises(OciError) as caught:
        pull(host, "aisoc/x:1", limits=Limits(manifest_bytes=1024))
    assert caught.value.code == "oci_too_large"


def test_manifest_that_is_not_json(liar: tuple[str, Routes]) -> None:
    """Garbage, duplicate keys, or a non-OCI type: `oci_bad_artifact`."""
    host, routes = liar
    for body in (
        b"<html>",
        b'{"schemaVersion": 2, "schemaVersion": 2}',
        json.dumps({"schemaVersion": 2, "layers": []}).encode(),
    ):
        routes["/v2/aisoc/x/manifests/1"] = Route(body, {"Content-Type": "application/json"})
        with pytest.raises(OciError) as caught:
            pull(host, "aisoc/x:1")
        assert caught.value.code == "oci_bad_artifact"


def test_stalled_registry_hits_the_deadline(liar: tuple[str, Routes]) -> None:
    """A registry that never answers is cut off at `deadline_s`."""
    host, routes = liar
    serve_package(routes, b"layer")
    routes["/v2/aisoc/x/manifests/1"].delay_s = 3
    started = time.monotonic()
    with pytest.raises(OciError) as caught:
        pull(host, "aisoc/x:1", limits=Limits(deadline_s=0.5))
    assert caught.value.code == "oci_timeout"
    assert time.monotonic() - started < 2.5


# ---- push refusals and `aisoc plugin push` -----------------------------------------------


@pytest.mark.oci
def test_push_refuses_an_unsafe_package_before_uploading(oci_registry: str, tmp_path: Path) -> None:
    """A package the daemon would refuse (here a symlink) is never pushed."""
    link = tarfile.TarInfo(f"{PLUGIN_ID}/evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    bad = build_package(tmp_path, extra=[link])
    with pytest.raises(OciError) as caught:
        push_package(bad, f"{oci_registry}/aisoc/unsafe:1", insecure_registries=[oci_registry])
    assert caught.value.code == "archive_link"
    status, _, _ = http("GET", f"http://{oci_registry}/v2/aisoc/unsafe/manifests/1")
    assert status == 404


@pytest.mark.oci
def test_push_refuses_top_dir_other_than_id(oci_registry: str, tmp_path: Path) -> None:
    """The package convention (top dir = plugin id) is checked before pushing."""
    bad = build_package(tmp_path, top="not-the-id")
    with pytest.raises(OciError) as caught:
        push_package(bad, f"{oci_registry}/aisoc/topdir:1", insecure_registries=[oci_registry])
    assert caught.value.code == "archive_layout"


@pytest.mark.oci
def test_push_main_prints_the_digest(
    oci_registry: str, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`aisoc plugin push FILE REF --insecure` exits 0 with the digest alone on stdout."""
    code = run_aisoc(["plugin", "push", str(package), f"{oci_registry}/aisoc/cli:1", "--insecure"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == pull(oci_registry, "aisoc/cli:1").digest + "\n"
    assert "pushed" in err


@pytest.mark.oci
def test_push_main_without_insecure_refuses_plain_http(
    oci_registry: str, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 1 with one `aisoc plugin push: error:` line."""
    code = run_aisoc(["plugin", "push", str(package), f"{oci_registry}/aisoc/cli:2"])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("aisoc plugin push: error: ")
    assert err.count("\n") == 1
    assert "plain HTTP" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["only-a-file.tar.gz"],
        ["f.tar.gz", "aisoc/x:1"],
        ["f.tar.gz", "ghcr.io/x"],
        ["f.tar.gz", "ghcr.io/x@sha256:" + "a" * 64],
        ["f.tar.gz", "ghcr.io/x:1", "--bogus"],
    ],
)
def test_push_main_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Missing or malformed arguments exit 2 with usage on stderr."""
    assert run_aisoc(["plugin", "push", *argv]) == 2
    assert "usage: aisoc plugin push" in capsys.readouterr().err


def test_push_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints usage and exits 0."""
    assert run_aisoc(["plugin", "push", "--help"]) == 0
    assert "OCI_REF" in capsys.readouterr().out


def test_push_main_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unreadable FILE is exit 1, not a traceback."""
    assert (
        run_aisoc(["plugin", "push", str(tmp_path / "nope.tar.gz"), "127.0.0.1:1/aisoc/x:1"]) == 1
    )
    assert capsys.readouterr().err.startswith("aisoc plugin push: error: ")


def test_push_main_not_a_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that is not a tar.gz is refused before any network use."""
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a package")
    assert (
        run_aisoc(["plugin", "push", str(junk), f"127.0.0.1:{free_port()}/aisoc/x:1", "--insecure"])
        == 1
    )
    assert "not a valid tar+gzip" in capsys.readouterr().err


def test_pulled_repr_hides_the_layer() -> None:
    """Logging a Pulled never dumps megabytes of layer bytes."""
    pulled = oci_client.Pulled(
        digest=sha(b"m"), layer=b"\x00" * 1000, reference=parse_reference("ghcr.io/o/x:1")
    )
    assert "layer" not in repr(pulled)


# ---- end to end: the daemon's install path ------------------------------------------------


@pytest.mark.oci
async def test_manager_installs_a_pushed_package(
    oci_registry: str, package: Path, env: Env, make_manager: ManagerFactory
) -> None:
    """push → install_from_oci: the verified plugin lands in plugins.dir/<id>, enabled."""
    ref = f"{oci_registry}/aisoc/e2e:1.2.0"
    digest = push_package(package, ref, insecure_registries=[oci_registry])
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    result = await manager.install_from_oci(f"{oci_registry}/aisoc/e2e@{digest}")
    assert (result.plugin_id, result.digest) == (PLUGIN_ID, digest)
    assert (env.plugins / PLUGIN_ID / "plugin.sig").is_file()
    record = manager.get(PLUGIN_ID)
    assert (record.signature_status, record.state) == ("verified", "enabled")


@pytest.mark.oci
async def test_manager_refuses_an_unsigned_package(
    oci_registry: str, tmp_path: Path, env: Env, make_manager: ManagerFactory
) -> None:
    """Strict mode: an unsigned package never reaches plugins.dir."""
    signed, unsigned = build_package(tmp_path / "signed"), tmp_path / "unsigned.tar.gz"
    with (
        tarfile.open(signed, "r:gz") as src,
        tarfile.open(unsigned, "w:gz", format=tarfile.PAX_FORMAT) as dst,
    ):
        for info in src.getmembers():
            if not info.name.endswith("plugin.sig"):
                dst.addfile(info, src.extractfile(info) if info.isfile() else None)
    ref = f"{oci_registry}/aisoc/unsigned:1"
    digest = push_package(unsigned, ref, insecure_registries=[oci_registry])
    manager = await make_manager(oci_allow_insecure_registries=(oci_registry,))
    with pytest.raises(PluginDError) as caught:
        await manager.install_from_oci(f"{oci_registry}/aisoc/unsigned@{digest}")
    assert caught.value.code.startswith("signature_")
    assert sorted(p.name for p in env.plugins.iterdir()) == []
