"""Honest packaging: the license, one version, an sdist with the service files, docs,
examples and a test suite that runs from the unpacked tree, and a hash-pinned lock file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from aisoc_plugind import __version__

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_file_matches_the_declared_license() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_one_version_source() -> None:
    """pyproject reads the version from the package; deploy files name the same one."""
    assert "version" in PYPROJECT["project"]["dynamic"]
    dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "aisoc_plugind.__version__"}
    for rel in ("deploy/kubernetes/deployment.yaml", "deploy/README.md", "deploy/Containerfile"):
        tags = re.findall(r"aisoc-plugind:(\d+\.\d+\.\d+\S*)", (REPO / rel).read_text())
        assert tags, rel
        assert set(tags) == {__version__}, rel


def _pins(text: str) -> dict[str, str]:
    return {
        m.group(1).lower(): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", text, re.MULTILINE)
    }


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    text = (REPO / "requirements.lock").read_text()
    pins = _pins(text)
    body = text[re.search(r"^[A-Za-z0-9_.-]+==", text, re.MULTILINE).start() :]  # type: ignore[union-attr]
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", body)
    assert len(blocks) == len(pins)
    for block in blocks:
        assert "--hash=sha256:" in block, block[:80]
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, floor = re.match(r"([A-Za-z0-9_.-]+)>=(\S+)", requirement).groups()  # type: ignore[union-attr]
        pinned = pins.get(name.lower())
        assert pinned is not None, f"{name} is not in requirements.lock"
        assert _version(pinned) >= _version(floor), f"{name}=={pinned} is below {floor}"
    options = [line for line in text.splitlines() if line.startswith("--")]
    assert options == []  # no --find-links / --index-url: nothing machine-specific


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (archive,) = out.glob("*.tar.gz")
    return archive


def test_the_sdist_carries_service_files_docs_examples_and_tests(sdist: Path) -> None:
    top = f"aisoc_plugind-{__version__}"
    assert sdist.name == f"{top}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.removeprefix(f"{top}/") for n in tar.getnames()}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()  # type: ignore[union-attr]
    for rel in (
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "config.example.toml",
        "requirements.lock",
        "systemd/aisoc-plugind.service",
        "systemd/aisoc-plugind.sysusers.conf",
        "systemd/aisoc-plugind.tmpfiles.conf",
        "systemd/aisoc-plugind.logrotate",
        "docs/service.md",
        "docs/events.schema.json",
        "docs/openapi.yaml",
        "examples/plugins/shodan-enricher/plugin.sig",
        "examples/keys/example-signer.pem",
        "deploy/Containerfile",
        "tests/conftest.py",
        "tests/vectors/vectors.json",
        "scripts/test.sh",
        "daemon/aisoc_plugind/__init__.py",
        "daemon/aisoc_plugind/authoring/templates",
    ):
        assert rel in names or any(n.startswith(rel + "/") for n in names), rel
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert f"Version: {__version__}" in pkg_info
    assert "License-Expression: Apache-2.0" in pkg_info


@pytest.mark.slow
def test_the_test_suite_runs_from_the_unpacked_sdist(sdist: Path, tmp_path: Path) -> None:
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / f"aisoc_plugind-{__version__}"
    env = {**os.environ, "PYTHONPATH": str(root / "daemon"), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/core"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert re.search(r"\d+ passed", done.stdout)
    # it tested its own copy of the code, not this checkout's
    probe = subprocess.run(
        [sys.executable, "-c", "import aisoc_plugind; print(aisoc_plugind.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip().startswith(str(root))
