"""Read deploy/: the Kubernetes manifests as objects, and the Containerfile as instructions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tests.ops.shipped import CONTAINERFILE, KUBERNETES

__all__ = [
    "MANIFESTS",
    "Instruction",
    "config_text",
    "containers",
    "daemon_container",
    "documents",
    "instructions",
    "mount_covering",
    "one",
    "pod_spec",
    "volume",
]

# Every manifest file but kustomize's own (which is not a Kubernetes object).
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
DAEMON_CONTAINER = "aisoc-plugind"


def documents(path: Path) -> list[dict[str, Any]]:
    """Return the YAML documents of one manifest file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str) -> dict[str, Any]:
    """Return the only object of `kind` across all manifests."""
    found = [doc for path in MANIFESTS for doc in documents(path) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment")["spec"]["template"]["spec"]
    return spec


def containers() -> list[dict[str, Any]]:
    """Return the init containers and the containers of the pod."""
    spec = pod_spec()
    return [*spec.get("initContainers", []), *spec["containers"]]


def daemon_container() -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c for c in pod_spec()["containers"] if c["name"] == DAEMON_CONTAINER
    ]
    assert len(found) == 1
    return found[0]


def volume(name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in pod_spec()["volumes"] if v["name"] == name]
    assert len(found) == 1, f"expected one volume {name!r}"
    return found[0]


def mount_covering(
    container: dict[str, Any], path: str | PurePosixPath | Path
) -> dict[str, Any] | None:
    """Return the volume mount of `container` that `path` lies in (the deepest), if any."""
    target = PurePosixPath(path)
    covering = [
        m
        for m in container.get("volumeMounts", [])
        if target == PurePosixPath(m["mountPath"])
        or PurePosixPath(m["mountPath"]) in target.parents
    ]
    return max(covering, key=lambda m: len(m["mountPath"]), default=None)


def config_text() -> str:
    """Return config.toml from the ConfigMap."""
    text: str = one("ConfigMap")["data"]["config.toml"]
    return text


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Containerfile instruction: keyword (upper case) and its arguments as written."""

    keyword: str
    args: str


def instructions(text: str | None = None) -> list[Instruction]:
    """Parse the Containerfile: continuation lines joined, comments and directives dropped."""
    source = CONTAINERFILE.read_text() if text is None else text
    logical: list[str] = []
    pending = ""
    for raw in source.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        out.append(Instruction(keyword.upper(), re.sub(r"\s+", " ", args).strip()))
    return out
