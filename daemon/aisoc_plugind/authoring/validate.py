"""Check a plugin directory as the daemon will read it and list every problem found."""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.exceptions
import yaml

from aisoc_plugind.authoring import scaffold
from aisoc_plugind.authoring.layout import DOC_FILES, is_junk, matches, read_file, scan
from aisoc_plugind.core import manifest as manifest_mod
from aisoc_plugind.core.config_schema import config_validator
from aisoc_plugind.core.manifest import MANIFEST_NAMES, Manifest
from aisoc_plugind.engine.bundle import (
    SIGNATURE_FILE,
    Bundle,
    Tree,
    read_bundle,
)
from aisoc_plugind.errors import (
    AuthoringError,
    BundleError,
    ManifestError,
)

PROG = "aisoc plugin"

__all__ = ["Finding", "Report", "Severity", "validate_plugin"]

_EXTENSION_SUFFIXES = (".so", ".pyd", ".dylib", ".dll")


_YAML_LINE_RE = re.compile(r"\bline (\d+)\b")


# Manifest problems raised before the document was loaded as a mapping.
_UNLOADABLE = frozenset(
    {"manifest_bad_syntax", "manifest_unsafe_yaml", "manifest_too_large", "manifest_not_mapping"}
)


class Severity(StrEnum):
    """How bad a finding is: errors fail `validate` and block `sign` and `package`."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One problem found in a plugin directory, located by file, line and manifest field."""

    severity: Severity
    code: str
    message: str
    path: str = ""
    line: int | None = None
    field: str = ""

    def render(self, root: Path) -> str:
        """Return `FILE[:LINE]: SEVERITY: [FIELD: ]MESSAGE [CODE]`."""
        where = str(root / self.path) if self.path else str(root)
        if self.line:
            where += f":{self.line}"
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}: {self.severity}: {what} [{self.code}]"


def _error(
    code: str, message: str, *, path: str = "", line: int | None = None, field: str = ""
) -> Finding:
    return Finding(
        severity=Severity.ERROR, code=code, message=message, path=path, line=line, field=field
    )


def _warning(
    code: str, message: str, *, path: str = "", line: int | None = None, field: str = ""
) -> Finding:
    return Finding(
        severity=Severity.WARNING, code=code, message=message, path=path, line=line, field=field
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """What `validate` found; `bundle` is the daemon's view (None when it refuses the dir)."""

    root: Path
    tree: Tree
    findings: tuple[Finding, ...]
    manifest: Manifest | None
    bundle: Bundle | None

    @property
    def errors(self) -> tuple[Finding, ...]:
        """Return the findings that make the plugin invalid."""
        return tuple(f for f in self.findings if f.severity is Severity.ERROR)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """Return the findings that are only advice."""
        return tuple(f for f in self.findings if f.severity is Severity.WARNING)

    def signed_parts(self) -> tuple[Bundle, Manifest]:
        """Return the bundle and manifest of a valid plugin; raise AuthoringError otherwise."""
        if self.errors or self.bundle is None or self.manifest is None:
            first = self.errors[0].render(self.root) if self.errors else "unreadable"
            raise AuthoringError(
                f"{self.root} is not a valid plugin ({len(self.errors)} error(s); first: "
                f"{first}); run `{PROG} validate {self.root}` for the full list"
            )
        return self.bundle, self.manifest


def validate_plugin(root: Path) -> Report:
    """Check a plugin directory as the daemon will read it and list every problem found."""
    tree = scan(root)
    bundle, findings = _daemon_view(root, tree)
    if bundle is not None:
        name: str | None = bundle.manifest_name
        data: bytes | None = bundle.manifest_bytes
        sources: Mapping[str, bytes] = bundle.sources
    else:
        name, data, sources = _author_view(root, tree)
    manifest, mapping, manifest_findings = _check_manifest(name, data)
    findings += manifest_findings
    findings += _check_sources(root, sources)
    if name is not None and mapping is not None:
        flagged = {f.field for f in manifest_findings}
        findings += _check_entry_point(name, mapping, sources, flagged)
        findings += _check_config_schema(name, mapping, flagged)
    findings += _check_coverage(tree, bundle)
    findings += _check_private_keys(root, tree)
    ordered = sorted(findings, key=lambda f: (f.path, f.line or 0, f.field))
    return Report(root=root, tree=tree, findings=tuple(ordered), manifest=manifest, bundle=bundle)


def _daemon_view(root: Path, tree: Tree) -> tuple[Bundle | None, list[Finding]]:
    """Read the directory with the daemon's reader; report why it refuses it."""
    if tree.refused:
        return None, [_error(r.code, r.why, path=r.path) for r in tree.refused]
    try:
        return read_bundle(root), []
    except BundleError as exc:
        if exc.code == "manifest_missing":
            return None, []  # the manifest check reports it
        return None, [_error(exc.code, exc.message)]


def _author_view(root: Path, tree: Tree) -> tuple[str | None, bytes | None, dict[str, bytes]]:
    """Read the manifest and sources directly, to keep checking what the daemon refused."""
    name = next((n for n in MANIFEST_NAMES if n in tree.files), None)
    data = read_file(root, name) if name is not None else None
    return name, data, {rel: read_file(root, rel) for rel in tree.python_files}


def _check_manifest(
    name: str | None, data: bytes | None
) -> tuple[Manifest | None, dict[str, Any] | None, list[Finding]]:
    """Parse the manifest; also return its mapping when only some fields are wrong."""
    if name is None or data is None:
        return (
            None,
            None,
            [
                _error(
                    "manifest_missing", f"no {' or '.join(MANIFEST_NAMES)} in the plugin directory"
                )
            ],
        )
    try:
        manifest = manifest_mod.parse(data, name)
    except ManifestError as exc:
        findings = [
            _error(p.code, p.message, path=name, field=p.field, line=_yaml_line(p.message))
            for p in exc.problems
        ]
        loaded = not any(p.code in _UNLOADABLE for p in exc.problems)
        return None, _load_mapping(name, data) if loaded else None, findings
    return manifest, manifest.as_json(), []


def _load_mapping(name: str, data: bytes) -> dict[str, Any] | None:
    """Load a manifest the strict parser already loaded (so no aliases), ignoring its fields."""
    try:
        text = data.decode("utf-8")
        loaded = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _yaml_line(message: str) -> int | None:
    match = _YAML_LINE_RE.search(message)
    return int(match.group(1)) if match else None


def _check_sources(root: Path, sources: Mapping[str, bytes]) -> list[Finding]:
    """Compile every `*.py` file as the loader will; report syntax errors and warnings."""
    out: list[Finding] = []
    for rel, data in sorted(sources.items()):
        out.extend(_compile_findings(root, rel, data))
    return out


def _compile_findings(root: Path, rel: str, data: bytes) -> list[Finding]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            compile(data, str(root / rel), "exec", dont_inherit=True)
        except SyntaxError as exc:
            return [_error("python_syntax_error", exc.msg, path=rel, line=exc.lineno)]
        except ValueError as exc:  # source with NUL bytes on some 3.11 releases
            return [_error("python_syntax_error", str(exc), path=rel)]
    return [
        _warning("python_compile_warning", str(w.message), path=rel, line=w.lineno) for w in caught
    ]


def _check_entry_point(
    source: str, mapping: Mapping[str, Any], sources: Mapping[str, bytes], flagged: set[str]
) -> list[Finding]:
    entry = mapping.get("entry_point", scaffold.ENTRY_POINT)
    if "entry_point" in flagged or not isinstance(entry, str):
        return []
    if entry not in sources:
        return [
            _error(
                "entry_point_missing",
                f"{entry} does not exist in the plugin directory",
                path=source,
                field="entry_point",
            )
        ]
    try:
        module = ast.parse(sources[entry], entry)
    except (SyntaxError, ValueError):
        return []  # reported by the compile check
    names = set(_bound_names(module.body))
    if "Plugin" in names or "*" in names:
        return []
    return [
        _warning(
            "plugin_class_missing",
            "binds no top-level name `Plugin`; the daemon "
            "instantiates `Plugin` from the entry module",
            path=entry,
        )
    ]


def _bound_names(body: Sequence[ast.AST]) -> Iterator[str]:
    """Yield the names a module body binds at top level (descending into if/try/with)."""
    for node in body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name
        elif isinstance(node, ast.Import | ast.ImportFrom):
            yield from ((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            yield from (n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        else:
            for block in ("body", "orelse", "finalbody", "handlers"):
                yield from _bound_names(getattr(node, block, []))


def _check_config_schema(
    source: str, mapping: Mapping[str, Any], flagged: set[str]
) -> list[Finding]:
    schema = mapping.get("config_schema")
    if "config_schema" in flagged or not isinstance(schema, dict):
        return []
    if "$schema" in schema and not isinstance(schema["$schema"], str):
        return [
            _error(
                "config_schema_invalid",
                "must be a string URI",
                field="config_schema.$schema",
                path=source,
            )
        ]
    try:
        validator = config_validator(schema)
    except jsonschema.exceptions.SchemaError as exc:
        field = "config_schema" + exc.json_path.removeprefix("$")
        return [
            _error(
                "config_schema_invalid",
                f"not a valid JSON Schema: {exc.message}",
                field=field,
                path=source,
            )
        ]
    try:
        empty = next(iter(validator.iter_errors({})), None)
    except Exception as exc:  # an unresolvable or endless $ref: nothing is fetched
        return [
            _error(
                "config_schema_invalid",
                f"cannot be used ({type(exc).__name__}): only $refs inside the schema are resolved",
                field="config_schema",
                path=source,
            )
        ]
    if empty is None:
        return []
    return [
        _warning(
            "config_required",
            f"an empty plugin config fails it ({empty.message}): "
            "the daemon refuses to load the plugin until the operator sets "
            "[plugin_config] for it; give every setting a default",
            field="config_schema",
            path=source,
        )
    ]


def _check_coverage(tree: Tree, bundle: Bundle | None) -> list[Finding]:
    """Warn about files the signature does not cover; fail on signed files packages drop."""
    out = [
        _warning("file_not_signed", f"not covered by plugin.sig: {what}", path=rel)
        for rel in tree.files
        if (what := _uncovered(rel)) is not None
    ]
    if all(name in tree.files for name in MANIFEST_NAMES):
        out.append(
            _warning(
                "manifest_ignored",
                f"ignored: {MANIFEST_NAMES[0]} wins when both manifests exist; delete one",
                path=MANIFEST_NAMES[1],
            )
        )
    if bundle is not None:
        hidden = sorted(set(bundle.sources) - set(tree.python_files))
        out.extend(
            _error(
                "file_excluded_but_signed",
                "the signature covers every *.py file, "
                f"but packages leave out {'/'.join(rel.split('/')[:-1])}/; move it "
                "out of the plugin directory",
                path=rel,
            )
            for rel in hidden
        )
    return out


def _uncovered(rel: str) -> str | None:
    """Say why a file matters although unsigned, or None when it does not."""
    if rel.endswith(".py") or rel in (SIGNATURE_FILE, *MANIFEST_NAMES):
        return None
    if matches(rel, DOC_FILES):
        return None
    if rel.endswith((".pyc", ".pyo")):
        return (
            "stray bytecode: the daemon never loads it and packages leave it out, but a "
            "normal import would run it; delete it"
        )
    if is_junk(rel):
        return None
    risk = "; if the code reads it, it can be changed without breaking the signature"
    if rel.endswith(_EXTENSION_SUFFIXES):
        return "a compiled extension module (native code)" + risk
    if rel.endswith(".pth"):
        return "a .pth file (site.py executes its `import` lines)" + risk
    return "a data file" + risk + " (keep data the code needs in a .py module)"


def _check_private_keys(root: Path, tree: Tree) -> list[Finding]:
    """Fail on a private key inside the plugin: it would ship in every package."""
    return [
        _error(
            "private_key_in_plugin",
            "holds a PEM private key, which would ship with "
            "the plugin; move it out of the plugin directory",
            path=rel,
        )
        for rel in tree.files
        if not rel.endswith(".py") and b"PRIVATE KEY-----" in read_file(root, rel, 8192)
    ]
