"""The code that runs is the code that was verified: read once, no links, no bytecode."""

from __future__ import annotations

import importlib.util
import marshal
import os
import sys
from pathlib import Path

import pytest

from aisoc_plugind.engine import bundle
from aisoc_plugind.engine.hosts import loader
from aisoc_plugind.errors import BundleError
from tests.conftest import VECTORS, PluginFactory, copy_tree


def _run(imported: loader.ImportedBundle, payload: dict[str, object]) -> object:
    import asyncio

    result = imported.module.Plugin().run(payload, {})
    return asyncio.run(result) if asyncio.iscoroutine(result) else result


def test_multi_module_plugin_imports_as_package(tmp_path: Path) -> None:
    """The vector geoip-enricher's relative import works; it answers AU for 1.1.1.1."""
    path = copy_tree(VECTORS / "plugins" / "geoip-enricher", tmp_path / "geo")
    b = bundle.read_bundle(path)
    imported = loader.import_bundle(b.path, b.sources, "plugin.py")
    try:
        assert _run(imported, {"ip": "1.1.1.1"}) == {"ip": "1.1.1.1", "country": "AU"}
        assert imported.package.startswith(loader.NAMESPACE + ".")
    finally:
        imported.release()


def test_nothing_goes_on_sys_path_and_no_bytecode_is_written(tmp_path: Path) -> None:
    """Importing a plugin leaves sys.path alone and writes no __pycache__."""
    path = copy_tree(VECTORS / "plugins" / "geoip-enricher", tmp_path / "geo")
    before = list(sys.path)
    b = bundle.read_bundle(path)
    imported = loader.import_bundle(b.path, b.sources, "plugin.py")
    imported.release()
    assert sys.path == before
    assert not list(path.rglob("__pycache__")) and not list(path.rglob("*.pyc"))


def test_release_frees_the_modules(tmp_path: Path) -> None:
    """After release no module of the package stays in sys.modules."""
    path = copy_tree(VECTORS / "plugins" / "geoip-enricher", tmp_path / "geo")
    b = bundle.read_bundle(path)
    imported = loader.import_bundle(b.path, b.sources, "plugin.py")
    imported.release()
    assert not [n for n in sys.modules if n.startswith(imported.package)]


@pytest.mark.parametrize(
    "sources",
    [
        {"plugin.py": b"class Plugin:\n    def run(self, p, c):\n        return {}\n"},
        {
            "plugin.py": b"from .lib import helper\nfrom .pkg import deep\nclass Plugin:\n"
            b"    def run(self, p, c):\n        return {}\n",
            "lib.py": b"def helper():\n    return 1\n",
            "pkg/__init__.py": b"",
            "pkg/deep.py": b"X = 1\n",
        },
        {
            "__init__.py": b"",
            "plugin.py": b"import importlib\nclass Plugin:\n    def run(self, p, c):\n"
            b"        return {}\n",
            "sub/mod.py": b"Y = 2\n",
        },
    ],
    ids=["flat", "relative-imports", "package"],
)
def test_release_frees_every_module_the_load_made(
    tmp_path: Path, sources: dict[str, bytes]
) -> None:
    """Flat, relative imports, a package: release leaves none of them in sys.modules,
    whatever else sys.modules holds (it is not walked)."""
    imported = loader.import_bundle(tmp_path, sources, "plugin.py")
    if "sub/mod.py" in sources:
        importlib.import_module(f"{imported.package}.sub.mod")  # imported later, at run time
    made = [n for n in sys.modules if n.startswith(imported.package + ".") or n == imported.package]
    assert len(made) >= 2
    imported.release()
    assert not [n for n in made if n in sys.modules]


def test_load_names_cannot_be_predicted_or_pre_seeded(tmp_path: Path) -> None:
    """Two loads in a row differ in more than a counter: a module planted under the
    counter's next names never stands in for the next load."""
    code = {"plugin.py": b"class Plugin:\n    def run(self, p, c):\n        return {'real': 1}\n"}
    first = loader.import_bundle(tmp_path, code, "plugin.py")
    counter = int(first.package.split(".")[1][1:].split("_")[0])
    evil = type(sys)("evil")
    exec("class Plugin:\n    def run(self, p, c):\n        return {'owned': 1}\n", vars(evil))
    planted = []
    for n in range(counter + 1, counter + 20):
        for name in (f"g{n}", f"g{n}_{first.package.rsplit('_', 1)[1]}"):
            for full in (f"{loader.NAMESPACE}.{name}", f"{loader.NAMESPACE}.{name}.plugin"):
                sys.modules[full] = evil
                planted.append(full)
    try:
        second = loader.import_bundle(tmp_path, code, "plugin.py")
        assert second.package not in planted
        assert second.package.rsplit("_", 1)[1] != first.package.rsplit("_", 1)[1]
        assert _run(second, {}) == {"real": 1}
        second.release()
    finally:
        first.release()
        for full in planted:
            sys.modules.pop(full, None)


def _plant_pyc(source: Path, code: str) -> Path:
    """Write a __pycache__ entry whose header matches `source` but whose code differs."""
    cache = Path(importlib.util.cache_from_source(str(source)))
    cache.parent.mkdir(exist_ok=True)
    st = source.stat()
    header = (
        importlib.util.MAGIC_NUMBER
        + (0).to_bytes(4, "little")
        + int(st.st_mtime).to_bytes(4, "little")
        + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    )
    cache.write_bytes(header + marshal.dumps(compile(code, str(source), "exec")))
    return cache


def test_planted_pyc_does_not_run(plugins: PluginFactory) -> None:
    """A matching-header .pyc with other code is ignored: the verified source runs."""
    path = plugins.write(
        "pyc", code="class Plugin:\n    def run(self, p, c):\n        return 'src'\n"
    )
    _plant_pyc(
        path / "plugin.py", "class Plugin:\n    def run(self, p, c):\n        return 'PLANTED'\n"
    )
    b = bundle.read_bundle(path)
    imported = loader.import_bundle(b.path, b.sources, "plugin.py")
    try:
        assert _run(imported, {}) == "src"
    finally:
        imported.release()


def test_sourceless_pyc_module_is_not_importable(plugins: PluginFactory) -> None:
    """A helpers.pyc without helpers.py cannot be imported by the plugin."""
    path = plugins.write("sourceless", code="from . import helpers\nclass Plugin: pass\n")
    (path / "helpers.pyc").write_bytes(
        importlib.util.MAGIC_NUMBER
        + b"\0" * 12
        + marshal.dumps(compile("X = 1", "helpers.py", "exec"))
    )
    b = bundle.read_bundle(path)
    with pytest.raises(ImportError):
        loader.import_bundle(b.path, b.sources, "plugin.py")


def test_file_changed_after_read_does_not_change_what_runs(plugins: PluginFactory) -> None:
    """TOCTOU: bytes read (and verified) are executed even if the file changes before import."""
    path = plugins.write(
        "toctou", code="class Plugin:\n    def run(self, p, c):\n        return 'verified'\n"
    )
    b = bundle.read_bundle(path)
    (path / "plugin.py").write_text(
        "class Plugin:\n    def run(self, p, c):\n        return 'swapped'\n"
    )
    imported = loader.import_bundle(b.path, b.sources, "plugin.py")
    try:
        assert _run(imported, {}) == "verified"
    finally:
        imported.release()


def test_symlink_escaping_the_plugin_dir_is_refused(plugins: PluginFactory, tmp_path: Path) -> None:
    """A symlinked module pointing outside the plugin dir is refused."""
    outside = tmp_path / "outside.py"
    outside.write_text("EVIL = True\n")
    path = plugins.write("link", sign=False)
    (path / "helper.py").symlink_to(outside)
    with pytest.raises(BundleError) as info:
        bundle.read_bundle(path)
    assert info.value.code == "bundle_symlink"
    assert str(outside) in info.value.message


def test_symlinked_subdirectory_is_refused(plugins: PluginFactory, tmp_path: Path) -> None:
    """A symlinked package directory is refused too."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "mod.py").write_text("X = 1\n")
    path = plugins.write("linkdir", sign=False)
    (path / "pkg").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleError, match="symlink"):
        bundle.read_bundle(path)


def test_symlinked_manifest_is_refused(plugins: PluginFactory, tmp_path: Path) -> None:
    """The manifest itself cannot be a link."""
    path = plugins.write("linkman", sign=False)
    real = tmp_path / "m.yaml"
    (path / "plugin.yaml").rename(real)
    (path / "plugin.yaml").symlink_to(real)
    with pytest.raises(BundleError) as info:
        bundle.read_bundle(path)
    assert info.value.code == "bundle_symlink"


def test_symlinked_plugin_directory_is_refused(plugins: PluginFactory, tmp_path: Path) -> None:
    """A plugin directory that is itself a symlink is refused."""
    real = plugins.write("real", sign=False)
    link = tmp_path / "plugins" / "alias"
    link.symlink_to(real)
    with pytest.raises(BundleError) as info:
        bundle.read_bundle(link)
    assert info.value.code == "bundle_symlink"


def test_fifo_named_py_is_refused_without_hanging(plugins: PluginFactory) -> None:
    """A FIFO planted as a module is refused (and opening it does not block)."""
    path = plugins.write("fifo", sign=False)
    os.mkfifo(path / "trap.py")
    with pytest.raises(BundleError) as info:
        bundle.read_bundle(path)
    assert info.value.code == "bundle_not_regular"


def test_oversized_source_file_is_refused(plugins: PluginFactory) -> None:
    """A module over the per-file cap is refused by size."""
    path = plugins.write("big", sign=False)
    (path / "huge.py").write_bytes(b"#" * (bundle.MAX_SOURCE_BYTES + 1))
    with pytest.raises(BundleError) as info:
        bundle.read_bundle(path)
    assert info.value.code == "bundle_too_large"


def test_missing_manifest_is_reported(tmp_path: Path) -> None:
    """A directory without a manifest has code manifest_missing."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError) as info:
        bundle.read_bundle(tmp_path / "empty")
    assert info.value.code == "manifest_missing"


def test_yaml_manifest_wins_over_json(plugins: PluginFactory) -> None:
    """When both manifests exist, plugin.yaml is the one read."""
    path = plugins.write("both", sign=False)
    (path / "aisoc-plugin.json").write_text('{"id": "json.id"}')
    assert bundle.read_bundle(path).manifest_name == "plugin.yaml"


def test_non_python_files_are_not_in_the_bundle(tmp_path: Path) -> None:
    """Only *.py files are part of the sources (README is not signed, not executed)."""
    path = copy_tree(VECTORS / "plugins" / "geoip-enricher", tmp_path / "geo")
    assert sorted(bundle.read_bundle(path).sources) == [
        "helpers/__init__.py",
        "helpers/lookup.py",
        "plugin.py",
    ]


def test_module_absent_from_bundle_is_not_found_on_disk(plugins: PluginFactory) -> None:
    """A module file created after the read is not importable: only the snapshot exists."""
    path = plugins.write(
        "late",
        code="class Plugin:\n    def run(self, p, c):\n"
        "        from . import late\n        return late.X\n",
    )
    b = bundle.read_bundle(path)
    (path / "late.py").write_text("X = 'injected'\n")
    imported = loader.import_bundle(b.path, b.sources, "plugin.py")
    try:
        with pytest.raises(ImportError):
            _run(imported, {})
    finally:
        imported.release()


def test_read_plugin_file_follows_no_link_at_any_level(tmp_path: Path) -> None:
    """A directory link in the middle of the path is refused like a file link."""
    from aisoc_plugind.engine.bundle import read_plugin_file
    from aisoc_plugind.errors import BundleError

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("s")
    root = tmp_path / "plugin"
    (root / "data").mkdir(parents=True)
    (root / "data" / "ok.txt").write_text("fine")
    (root / "linked").symlink_to(outside)
    assert read_plugin_file(root, "data/ok.txt", cap=100) == b"fine"
    with pytest.raises(BundleError):
        read_plugin_file(root, "linked/secret.txt", cap=100)
