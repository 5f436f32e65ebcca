"""Import a verified bundle as a package from memory: no sys.path, no bytecode cache.

Each load gets its own private package name (`_aisoc_plugins.g<N>_<random>`), so a reload
imports a fresh copy beside the old one, which keeps serving until it is swapped out. The
random part keeps a plugin sharing the process from predicting, and so pre-seeding in
`sys.modules`, the names of the next loads; the importer remembers the module names it made
for each load, so forgetting a load never walks all of `sys.modules`. A finder on
`sys.meta_path` answers only for names under that prefix and only with the bundle's bytes,
compiled with `compile()`: importlib's file loaders, which read and write `__pycache__`, are
never involved, and nothing of the plugin directory is ever put on `sys.path`.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import itertools
import os
import secrets
import sys
import threading
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, ModuleType

__all__ = [
    "NAMESPACE",
    "BundleImporter",
    "ImportedBundle",
    "entry_module_name",
    "import_bundle",
    "takes_config",
]

NAMESPACE = "_aisoc_plugins"
_generation = itertools.count(1)
# The random part of package names: a keyed hash of the load's number under a secret drawn
# once per process (after a fork, see `_reseed`), not a system call per load.
_secret = secrets.token_bytes(32)


def _unpredictable(number: int) -> str:
    return hashlib.blake2b(number.to_bytes(8, "little"), key=_secret, digest_size=8).hexdigest()


def _reseed() -> None:
    global _secret
    _secret = secrets.token_bytes(32)


os.register_at_fork(after_in_child=_reseed)  # hosts forked from the zygote differ


@dataclass(frozen=True, slots=True)
class _Source:
    path: str  # relative posix path inside the bundle
    is_package: bool


class BundleImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serve the modules of every loaded bundle from memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bundles: dict[str, tuple[Path, Mapping[str, bytes]]] = {}
        self._code: dict[str, Mapping[str, CodeType]] = {}
        self._names: dict[str, set[str]] = {}  # per package: the module names it was given

    def register(
        self,
        package: str,
        root: Path,
        sources: Mapping[str, bytes],
        code: Mapping[str, CodeType] | None = None,
    ) -> None:
        with self._lock:
            self._bundles[package] = (root, sources)
            self._names[package] = {package}
            if code:
                self._code[package] = code

    def unregister(self, package: str) -> None:
        with self._lock:
            self._bundles.pop(package, None)
            self._code.pop(package, None)
            names = self._names.pop(package, ())
        for name in names:
            sys.modules.pop(name, None)

    def _note(self, package: str, fullname: str) -> None:
        with self._lock:
            known = self._names.get(package)
            if known is not None:
                known.add(fullname)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(NAMESPACE + "."):
            return None
        found = self._locate(fullname)
        if found is None:
            return None
        root, source = found
        self._note(".".join(fullname.split(".")[:2]), fullname)
        origin = str(root / source.path) if source.path else str(root)
        spec = importlib.util.spec_from_loader(
            fullname, self, origin=origin, is_package=source.is_package
        )
        if spec is not None:
            spec.has_location = bool(source.path)
            if source.is_package:
                spec.submodule_search_locations = []
        return spec

    def _locate(self, fullname: str) -> tuple[Path, _Source] | None:
        parts = fullname.split(".")
        package = ".".join(parts[:2])
        with self._lock:
            entry = self._bundles.get(package)
        if entry is None:
            return None
        root, sources = entry
        rel = "/".join(parts[2:])
        return (root, s) if (s := _source_for(rel, sources)) is not None else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # default module creation

    def exec_module(self, module: ModuleType) -> None:
        found = self._locate(module.__name__)
        if found is None:  # pragma: no cover - find_spec answered for it moments ago
            raise ImportError(f"no verified source for {module.__name__}")
        root, source = found
        if not source.path:
            return  # an implicit package directory: nothing to execute
        package = ".".join(module.__name__.split(".")[:2])
        filename = str(root / source.path)
        module.__file__ = filename
        # Compiled already (by the scan, from these same verified bytes), or compile now.
        code = self._code.get(package, {}).get(source.path)
        if code is None:
            data = self._bundles[package][1][source.path]
            code = compile(data, filename, "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102 - the verified bytes of a trusted plugin

    def get_source(self, fullname: str) -> str | None:
        """Give tracebacks the verified source, not whatever is on disk now."""
        found = self._locate(fullname)
        if found is None or not found[1].path:
            return None
        package = ".".join(fullname.split(".")[:2])
        return self._bundles[package][1][found[1].path].decode("utf-8", "replace")


def _source_for(rel: str, sources: Mapping[str, bytes]) -> _Source | None:
    """Map a dotted-relative module path to the bundle file that implements it."""
    init = f"{rel}/__init__.py" if rel else "__init__.py"
    if init in sources:
        return _Source(init, True)
    if rel and f"{rel}.py" in sources:
        return _Source(f"{rel}.py", False)
    # A directory holding Python files without __init__.py imports as an empty package.
    if not rel or any(p.startswith(rel + "/") for p in sources):
        return _Source("", True)
    return None


_importer = BundleImporter()
_install_lock = threading.Lock()


def _ensure_installed() -> BundleImporter:
    with _install_lock:
        if _importer not in sys.meta_path:
            sys.meta_path.insert(0, _importer)
        if NAMESPACE not in sys.modules:
            ns = ModuleType(NAMESPACE, "Private namespace of aisoc-plugind plugin packages.")
            ns.__path__ = []
            sys.modules[NAMESPACE] = ns
    return _importer


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportedBundle:
    """A bundle imported under its private package; `module` is the entry module."""

    package: str
    module: ModuleType

    def release(self) -> None:
        """Forget the package's modules so they can be garbage-collected."""
        _importer.unregister(self.package)


def entry_module_name(entry_point: str) -> str:
    """Return the dotted name of an entry point path (`a/b.py` -> `a.b`)."""
    return entry_point.removesuffix(".py").replace("/", ".")


def import_bundle(
    root: Path,
    sources: Mapping[str, bytes],
    entry_point: str,
    code: Mapping[str, CodeType] | None = None,
) -> ImportedBundle:
    """Import `sources` as a fresh private package and return its entry module.

    `code` holds what the scan compiled from these same bytes (files missing from it are
    compiled here). Raises whatever the plugin's module code raises; the caller translates it.
    """
    importer = _ensure_installed()
    # Unpredictable: a plugin sharing the process cannot put entries under this load's
    # names beforehand (a counter alone could be guessed).
    number = next(_generation)
    package = f"{NAMESPACE}.g{number}_{_unpredictable(number)}"
    sys.modules.pop(package, None)
    importer.register(package, root, sources, code)
    entry = entry_module_name(entry_point)
    try:
        if "__init__.py" in sources or "." in entry:
            importlib.import_module(package)
            module = importlib.import_module(f"{package}.{entry}")
        else:  # the usual layout: import machinery would only add time around the same steps
            module = _import_flat(importer, package, root, entry)
    except BaseException:
        importer.unregister(package)
        raise
    return ImportedBundle(package=package, module=module)


def _import_flat(importer: BundleImporter, package: str, root: Path, entry: str) -> ModuleType:
    """Import a top-level entry module of a bundle without `__init__.py`: the same module
    attributes and `sys.modules` entries as `importlib.import_module` gives it."""
    parent = ModuleType(package)
    parent.__spec__ = importlib.machinery.ModuleSpec(package, importer, is_package=True)
    parent.__spec__.submodule_search_locations = []
    parent.__loader__, parent.__package__, parent.__path__ = importer, package, []
    sys.modules[package] = parent
    name = f"{package}.{entry}"
    if importer.find_spec(name, None) is None:  # (it also notes `name` as this load's)
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = ModuleType(name)
    spec = importlib.machinery.ModuleSpec(name, importer, origin=str(root / f"{entry}.py"))
    spec.has_location = True
    module.__spec__, module.__loader__, module.__package__ = spec, importer, package
    sys.modules[name] = module
    importer.exec_module(module)
    module = sys.modules[name]  # as importlib does: the module may have replaced itself
    setattr(parent, entry, module)
    return module


def takes_config(cls: type) -> bool:
    """Return True when `Plugin(config)` takes a positional argument (besides self)."""
    init: object = getattr(cls, "__init__", None)
    new: object = getattr(cls, "__new__", None)
    if type(cls) is type and new is object.__new__:  # the usual class: look quickly
        if init is object.__init__:
            return False
        if isinstance(init, types.FunctionType):
            code = init.__code__
            return code.co_argcount > 1 or bool(code.co_flags & inspect.CO_VARARGS)
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params
    )
