"""Read and build the OCI documents of a plugin package: one manifest naming one layer (pure)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from aisoc_plugind.delivery.reference import DIGEST_RE
from aisoc_plugind.errors import OciError

__all__ = [
    "ARTIFACT_TYPE",
    "EMPTY_CONFIG",
    "MEDIA_TYPE_LAYER",
    "OCI_EMPTY",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Descriptor",
    "build_manifest",
    "layer_descriptor",
    "sha256_digest",
]

MEDIA_TYPE_LAYER = "application/vnd.aisoc.plugin.layer.v1.tar+gzip"


ARTIFACT_TYPE = "application/vnd.aisoc.plugin.v1"


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


OCI_INDEX = "application/vnd.oci.image.index.v1+json"


OCI_EMPTY = "application/vnd.oci.empty.v1+json"


EMPTY_CONFIG = b"{}"


ANNOTATION_TITLE = "org.opencontainers.image.title"


ANNOTATION_VERSION = "org.opencontainers.image.version"


ANNOTATION_PLUGIN_ID = "io.aisoc.plugin.id"


ANNOTATION_PLUGIN_VERSION = "io.aisoc.plugin.version"


@dataclass(frozen=True, slots=True, kw_only=True)
class Descriptor:
    """An OCI content descriptor reduced to what we use."""

    media_type: str
    digest: str
    size: int


def sha256_digest(data: bytes) -> str:
    """Return the OCI digest string of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_descriptor(raw: bytes, content_type: str | None) -> Descriptor:
    """Return the package layer of a manifest, or raise `oci_bad_artifact` explaining why not.

    Accepted: an OCI image manifest (never an index) whose `artifactType`, when present, is
    ours, holding exactly one layer of MEDIA_TYPE_LAYER with a sha256 digest.
    """
    doc = _strict_json(raw)
    _check_manifest_type(doc, content_type)
    _descriptor(doc.get("config"), "config")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and artifact_type != ARTIFACT_TYPE:
        raise _bad_artifact(f"its artifactType is {artifact_type!r}, not {ARTIFACT_TYPE}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1:
        count = len(layers) if isinstance(layers, list) else "no"
        raise _bad_artifact(f"it has {count} layers; a plugin package is exactly one")
    layer = _descriptor(layers[0], "layer")
    if layer.media_type != MEDIA_TYPE_LAYER:
        raise _bad_artifact(f"its layer is {layer.media_type!r}, not {MEDIA_TYPE_LAYER}")
    return layer


def _strict_json(raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("a key appears twice")
        return dict(pairs)

    try:
        doc = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=no_duplicates,
            parse_constant=lambda c: _raise(ValueError(f"{c} is not JSON")),
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad_artifact(f"the manifest is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise _bad_artifact("the manifest is not a JSON object")
    return doc


def _check_manifest_type(doc: Mapping[str, Any], content_type: str | None) -> None:
    declared = doc.get("mediaType") or (content_type or "").split(";")[0].strip()
    if declared == OCI_INDEX or "manifests" in doc:
        raise _bad_artifact("it is an image index (several manifests); push one package")
    if declared != OCI_MANIFEST or doc.get("schemaVersion") != 2:
        raise _bad_artifact(
            f"it is {declared or 'an untyped document'!r}, not an OCI image "
            "manifest (schemaVersion 2)"
        )


def _descriptor(value: Any, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _bad_artifact(f"its {what} descriptor is not an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise _bad_artifact(f"its {what} descriptor lacks a mediaType or a digest")
    if not DIGEST_RE.match(digest):
        raise _bad_artifact(f"its {what} digest {digest[:100]!r} is not sha256:<64 hex>")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _bad_artifact(f"its {what} size {size!r} is not a non-negative integer")
    return Descriptor(media_type=media_type, digest=digest, size=size)


def _bad_artifact(why: str) -> OciError:
    return OciError(f"not an AiSOC plugin package: {why}", code="oci_bad_artifact")


def _raise(exc: Exception) -> NoReturn:
    raise exc


def build_manifest(
    layer: Descriptor, *, title: str, plugin_id: str | None, version: str | None
) -> bytes:
    """Return the canonical bytes of an OCI 1.1 artifact manifest for one package layer."""
    annotations = {ANNOTATION_TITLE: title}
    if plugin_id is not None and version is not None:
        annotations |= {
            ANNOTATION_PLUGIN_ID: plugin_id,
            ANNOTATION_PLUGIN_VERSION: version,
            ANNOTATION_VERSION: version,
        }
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": OCI_EMPTY,
            "digest": sha256_digest(EMPTY_CONFIG),
            "size": len(EMPTY_CONFIG),
        },
        "layers": [
            {
                "mediaType": layer.media_type,
                "digest": layer.digest,
                "size": layer.size,
                "annotations": {ANNOTATION_TITLE: title},
            }
        ],
        "annotations": annotations,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
