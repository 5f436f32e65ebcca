"""Run the plugin authoring commands: `aisoc plugin new|validate|keygen|sign|verify|package`.

`main(argv)` takes the words after `aisoc plugin` and returns the exit status (0 success,
1 the operation failed, 2 usage error); only the CLI exits. The work is done by plain
functions (`validate_plugin`, `write_keypair`, `sign_plugin`, `verify_plugin`,
`build_package`, `create_plugin`) that raise `AuthoringError` or another `PluginDError`.

Signing reads the plugin exactly as the daemon does (`bundle.read_bundle`): the digest covers
the manifest minus `signature`/`trust` and every regular `*.py` file, recursively (INTERFACE §4).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.validators
import nacl.signing
import yaml

from aisoc_plugind.authoring import scaffold
from aisoc_plugind.core import manifest as manifest_mod
from aisoc_plugind.core.manifest import MANIFEST_NAMES, Manifest
from aisoc_plugind.core.signing import (
    SignatureStatus,
    TrustDecision,
    TrustMode,
    decide,
    encode_signature,
    load_private_key,
    plugin_digest,
    private_key_pem,
    public_key_pem,
    sign_digest,
)
from aisoc_plugind.engine.bundle import MAX_DEPTH, SIGNATURE_FILE, Bundle, read_bundle
from aisoc_plugind.engine.keyring import SkippedKey, load_keyring
from aisoc_plugind.errors import (
    AuthoringError,
    BundleError,
    KeyFileError,
    ManifestError,
    PluginDError,
)

PROG = "aisoc plugin"
PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
MAX_KEY_FILE_BYTES = 16 * 1024
# Never scanned nor packaged: caches and VCS metadata.
EXCLUDED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".pytest_cache",
                           ".mypy_cache", ".ruff_cache", ".idea", ".vscode"})
# Never packaged (a `*.py` name always is, since the signature covers it): bytecode, editor
# swap/backup/lock files, desktop metadata.
JUNK_FILES = ("*.pyc", "*.pyo", ".DS_Store", "Thumbs.db", "*~", "*.swp", "*.swo", "*.swx",
              ".#*", "#*#")
# Side files that carry no behaviour; the "not covered by the signature" warning skips them.
DOC_FILES = ("README*", "LICENSE*", "LICENCE*", "COPYING*", "NOTICE*", "CHANGELOG*")
_EXTENSION_SUFFIXES = (".so", ".pyd", ".dylib", ".dll")
_YAML_LINE_RE = re.compile(r"\bline (\d+)\b")
_UNSAFE_NAME_CHARS_RE = re.compile(r"[^A-Za-z0-9._+-]")
# Manifest problems raised before the document was loaded as a mapping.
_UNLOADABLE = frozenset({"manifest_bad_syntax", "manifest_unsafe_yaml", "manifest_too_large",
                         "manifest_not_mapping"})


# ---- the plugin directory as files -------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """An entry of a plugin directory that no tool will read: a link or a special file."""

    path: str
    code: str
    why: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Tree:
    """The entries of a plugin directory outside `EXCLUDED_DIRS`, as sorted posix paths."""

    root: Path
    dirs: tuple[str, ...]
    files: tuple[str, ...]
    refused: tuple[Refused, ...]

    @property
    def python_files(self) -> tuple[str, ...]:
        """Return the `*.py` files (what the signature covers when nothing is refused)."""
        return tuple(f for f in self.files if f.endswith(".py"))

    def packaged(self) -> tuple[str, ...]:
        """Return the files a package holds: everything but junk; every `*.py` file."""
        return tuple(f for f in self.files if f.endswith(".py") or not _is_junk(f))


def scan_tree(root: Path) -> Tree:
    """List a plugin directory without following links; raise AuthoringError if it is none."""
    _require_plugin_dir(root)
    dirs: list[str] = []
    files: list[str] = []
    refused: list[Refused] = []
    pending = [""]
    while pending:
        prefix = pending.pop()
        for entry in _entries(root / prefix):
            rel = prefix + entry.name
            kind = _kind(entry, rel)
            if isinstance(kind, Refused):
                refused.append(kind)
            elif kind == "file":
                files.append(rel)
            elif entry.name not in EXCLUDED_DIRS:
                dirs.append(rel)
                pending.append(rel + "/")
    return Tree(root=root, dirs=tuple(sorted(dirs)), files=tuple(sorted(files)),
                refused=tuple(sorted(refused, key=lambda r: r.path)))


def _require_plugin_dir(root: Path) -> None:
    if root.is_symlink():
        raise AuthoringError(f"{root} is a symlink; the daemon refuses linked plugin "
                             "directories, give the real path")
    if not root.exists():
        raise AuthoringError(f"{root}: no such directory")
    if not root.is_dir():
        raise AuthoringError(f"{root} is not a directory")


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    with os.scandir(directory) as found:
        return sorted(found, key=lambda e: e.name)


def _kind(entry: os.DirEntry[str], rel: str) -> str | Refused:
    """Return "file", "dir" or why the entry is refused."""
    if entry.is_symlink():
        return Refused(path=rel, code="bundle_symlink",
                       why=f"a symlink (to {os.readlink(entry.path)}); links are refused")
    if entry.is_dir(follow_symlinks=False):
        if rel.count("/") >= MAX_DEPTH:
            return Refused(path=rel, code="bundle_too_large",
                           why=f"nested deeper than {MAX_DEPTH} levels")
        return "dir"
    if entry.is_file(follow_symlinks=False):
        return "file"
    return Refused(path=rel, code="bundle_not_regular",
                   why="not a regular file (a FIFO, socket or device)")


def _name(rel: str) -> str:
    return rel.rsplit("/", 1)[-1]


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    name = _name(rel)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_junk(rel: str) -> bool:
    return _matches(rel, JUNK_FILES)


def _read_regular(path: Path, limit: int | None = None) -> bytes:
    """Read a regular file without following a final symlink (up to `limit` bytes)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise AuthoringError(f"{path} is not a regular file")
        return fh.read() if limit is None else fh.read(limit)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with exactly `mode`; never overwrite, never follow a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise AuthoringError(f"{path} already exists; refusing to overwrite it") from exc
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)  # the umask must not decide a key file's mode
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_replace(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `path` atomically: a temporary file beside it, then rename over it."""
    # The `~` suffix makes a leftover temporary file junk that packages leave out.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix="~")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- validate -----------------------------------------------------------------------------


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


def _error(code: str, message: str, *, path: str = "", line: int | None = None,
           field: str = "") -> Finding:
    return Finding(severity=Severity.ERROR, code=code, message=message, path=path, line=line,
                   field=field)


def _warning(code: str, message: str, *, path: str = "", line: int | None = None,
             field: str = "") -> Finding:
    return Finding(severity=Severity.WARNING, code=code, message=message, path=path,
                   line=line, field=field)


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
                f"{first}); run `{PROG} validate {self.root}` for the full list")
        return self.bundle, self.manifest


def validate_plugin(root: Path) -> Report:
    """Check a plugin directory as the daemon will read it and list every problem found."""
    tree = scan_tree(root)
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
    return Report(root=root, tree=tree, findings=tuple(ordered), manifest=manifest,
                  bundle=bundle)


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
    data = _read_regular(root / name) if name is not None else None
    return name, data, {rel: _read_regular(root / rel) for rel in tree.python_files}


def _check_manifest(
    name: str | None, data: bytes | None
) -> tuple[Manifest | None, dict[str, Any] | None, list[Finding]]:
    """Parse the manifest; also return its mapping when only some fields are wrong."""
    if name is None or data is None:
        return None, None, [_error("manifest_missing", f"no {' or '.join(MANIFEST_NAMES)} in "
                                                       "the plugin directory")]
    try:
        manifest = manifest_mod.parse(data, name)
    except ManifestError as exc:
        findings = [_error(p.code, p.message, path=name, field=p.field,
                           line=_yaml_line(p.message)) for p in exc.problems]
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
    return [_warning("python_compile_warning", str(w.message), path=rel, line=w.lineno)
            for w in caught]


def _check_entry_point(
    source: str, mapping: Mapping[str, Any], sources: Mapping[str, bytes], flagged: set[str]
) -> list[Finding]:
    entry = mapping.get("entry_point", scaffold.ENTRY_POINT)
    if "entry_point" in flagged or not isinstance(entry, str):
        return []
    if entry not in sources:
        return [_error("entry_point_missing", f"{entry} does not exist in the plugin directory",
                       path=source, field="entry_point")]
    try:
        module = ast.parse(sources[entry], entry)
    except (SyntaxError, ValueError):
        return []  # reported by the compile check
    names = set(_bound_names(module.body))
    if "Plugin" in names or "*" in names:
        return []
    return [_warning("plugin_class_missing", "binds no top-level name `Plugin`; the daemon "
                     "instantiates `Plugin` from the entry module", path=entry)]


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


def _check_config_schema(source: str, mapping: Mapping[str, Any], flagged: set[str]
                         ) -> list[Finding]:
    schema = mapping.get("config_schema")
    if "config_schema" in flagged or not isinstance(schema, dict):
        return []
    if "$schema" in schema and not isinstance(schema["$schema"], str):
        return [_error("config_schema_invalid", "must be a string URI",
                       field="config_schema.$schema", path=source)]
    try:
        validator = manifest_mod.config_validator(schema)
    except jsonschema.exceptions.SchemaError as exc:
        field = "config_schema" + exc.json_path.removeprefix("$")
        return [_error("config_schema_invalid", f"not a valid JSON Schema: {exc.message}",
                       field=field, path=source)]
    try:
        empty = next(iter(validator.iter_errors({})), None)
    except Exception as exc:  # an unresolvable or endless $ref: nothing is fetched
        return [_error("config_schema_invalid",
                       f"cannot be used ({type(exc).__name__}): only $refs inside the schema "
                       "are resolved", field="config_schema", path=source)]
    if empty is None:
        return []
    return [_warning("config_required", f"an empty plugin config fails it ({empty.message}): "
                     "the daemon refuses to load the plugin until the operator sets "
                     "[plugin_config] for it; give every setting a default",
                     field="config_schema", path=source)]


def _check_coverage(tree: Tree, bundle: Bundle | None) -> list[Finding]:
    """Warn about files the signature does not cover; fail on signed files packages drop."""
    out = [_warning("file_not_signed", f"not covered by plugin.sig: {what}", path=rel)
           for rel in tree.files if (what := _uncovered(rel)) is not None]
    if all(name in tree.files for name in MANIFEST_NAMES):
        out.append(_warning("manifest_ignored", f"ignored: {MANIFEST_NAMES[0]} wins when both "
                            "manifests exist; delete one", path=MANIFEST_NAMES[1]))
    if bundle is not None:
        hidden = sorted(set(bundle.sources) - set(tree.python_files))
        out.extend(_error("file_excluded_but_signed", "the signature covers every *.py file, "
                          f"but packages leave out {'/'.join(rel.split('/')[:-1])}/; move it "
                          "out of the plugin directory", path=rel) for rel in hidden)
    return out


def _uncovered(rel: str) -> str | None:
    """Say why a file matters although unsigned, or None when it does not."""
    if rel.endswith(".py") or rel in (SIGNATURE_FILE, *MANIFEST_NAMES):
        return None
    if _matches(rel, DOC_FILES):
        return None
    if rel.endswith((".pyc", ".pyo")):
        return ("stray bytecode: the daemon never loads it and packages leave it out, but a "
                "normal import would run it; delete it")
    if _is_junk(rel):
        return None
    risk = "; if the code reads it, it can be changed without breaking the signature"
    if rel.endswith(_EXTENSION_SUFFIXES):
        return "a compiled extension module (native code)" + risk
    if rel.endswith(".pth"):
        return "a .pth file (site.py executes its `import` lines)" + risk
    return "a data file" + risk + " (keep data the code needs in a .py module)"


def _check_private_keys(root: Path, tree: Tree) -> list[Finding]:
    """Fail on a private key inside the plugin: it would ship in every package."""
    return [_error("private_key_in_plugin", "holds a PEM private key, which would ship with "
                   "the plugin; move it out of the plugin directory", path=rel)
            for rel in tree.files
            if not rel.endswith(".py") and b"PRIVATE KEY-----" in _read_regular(root / rel, 8192)]


# ---- keygen -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyPair:
    """The files `keygen` wrote and the raw public key."""

    private_path: Path
    public_path: Path
    public_key: bytes


def write_keypair(out_dir: Path) -> KeyPair:
    """Create an Ed25519 key pair in `out_dir`: PKCS#8 `signing.key` (0600), SPKI `signing.pub`."""
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise AuthoringError(f"{path} already exists; keygen never overwrites a key "
                                 "(choose another --out)")
    key = nacl.signing.SigningKey.generate()
    _write_new(private_path, private_key_pem(key), 0o600)
    try:
        _write_new(public_path, public_key_pem(key.verify_key), 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return KeyPair(private_path=private_path, public_path=public_path,
                   public_key=bytes(key.verify_key))


# ---- sign ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Signed:
    """A signature made over a plugin, ready to be written as `plugin.sig`."""

    manifest: Manifest
    files: tuple[str, ...]
    digest: bytes
    signature_file: bytes
    public_key: bytes


def read_private_key(path: Path) -> Any:
    """Load an unencrypted Ed25519 PKCS#8 PEM key file (a nacl SigningKey)."""
    with path.open("rb") as fh:
        data = fh.read(MAX_KEY_FILE_BYTES + 1)
    if b"ENCRYPTED PRIVATE KEY" in data:
        raise AuthoringError(f"{path}: encrypted keys are not supported; write a decrypted "
                             f"copy with `openssl pkey -in {path} -out plain.key`")
    try:
        return load_private_key(data)
    except KeyFileError as exc:
        raise AuthoringError(f"{path}: {exc.message}") from exc


def sign_plugin(plugin_dir: Path, key: Any) -> Signed:
    """Validate the plugin, then sign the digest the daemon will compute for it."""
    bundle, manifest = validate_plugin(plugin_dir).signed_parts()
    digest = plugin_digest(manifest.as_json(), bundle.sources)
    raw = sign_digest(digest, key)
    key.verify_key.verify(digest, raw)  # never write a signature that does not verify
    return Signed(manifest=manifest, files=tuple(bundle.sources), digest=digest,
                  signature_file=encode_signature(raw), public_key=bytes(key.verify_key))


# ---- verify -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    """The strict-mode trust decision for a plugin, with what was checked."""

    manifest: Manifest
    decision: TrustDecision
    files: tuple[str, ...]
    key_ids: tuple[str, ...]
    skipped_keys: tuple[SkippedKey, ...]


def verify_plugin(plugin_dir: Path, keys_dir: Path) -> Verification:
    """Decide, as the daemon does in strict mode, whether a trusted key verifies the plugin."""
    if not keys_dir.is_dir():
        raise AuthoringError(f"{keys_dir}: no such keys directory")
    keyring = load_keyring(keys_dir)
    bundle = read_bundle(plugin_dir)
    manifest = manifest_mod.parse(bundle.manifest_bytes, bundle.manifest_name)
    digest = plugin_digest(manifest.as_json(), bundle.sources)
    decision = decide(digest=digest, signature_file=bundle.signature, keys=keyring.keys,
                      mode=TrustMode.STRICT)
    return Verification(manifest=manifest, decision=decision, files=tuple(bundle.sources),
                        key_ids=tuple(sorted(keyring.keys)), skipped_keys=keyring.skipped)


# ---- package ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Package:
    """A reproducible `.tar.gz` of a plugin, in memory."""

    manifest: Manifest
    data: bytes
    members: tuple[str, ...]
    signed: bool

    def default_name(self) -> str:
        """Return `<id>-<version>.tar.gz` (characters unsafe in a file name become `_`)."""
        version = _UNSAFE_NAME_CHARS_RE.sub("_", self.manifest.version)
        return f"{self.manifest.id}-{version}.tar.gz"


def build_package(plugin_dir: Path, *, mtime: int = 0) -> Package:
    """Archive a valid plugin under a top directory named by its id, byte-reproducibly.

    Entries are sorted; owners are 0/""; modes are 0644 (files) and 0755 (directories); every
    mtime is `mtime`; the gzip header has mtime 0 and no file name. `*.py` files hold exactly
    the bytes that were validated.
    """
    report = validate_plugin(plugin_dir)
    bundle, manifest = report.signed_parts()
    contents: dict[str, bytes] = {}
    for rel in report.tree.packaged():
        contents[rel] = (bundle.sources[rel] if rel in bundle.sources
                         else _read_regular(plugin_dir / rel))
    members = _members(manifest.id, contents)
    data = _tar_gz(members, mtime)
    return Package(manifest=manifest, data=data, members=tuple(name for name, _ in members),
                   signed=SIGNATURE_FILE in contents)


def _members(top: str, contents: Mapping[str, bytes]) -> list[tuple[str, bytes | None]]:
    """Return `(archive name, bytes or None for a directory)`, parents before children."""
    dirs = {"/".join(rel.split("/")[:i]) for rel in contents for i in range(1, rel.count("/") + 1)}
    entries: list[tuple[str, bytes | None]] = [(d, None) for d in dirs]
    entries += list(contents.items())
    entries.sort(key=lambda e: e[0].split("/"))
    return [(top, None)] + [(f"{top}/{rel}", data) for rel, data in entries]


def _tar_gz(members: Sequence[tuple[str, bytes | None]], mtime: int) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_tar_info(name, data, mtime), None if data is None else io.BytesIO(data))
    return buffer.getvalue()


def _tar_info(name: str, data: bytes | None, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if data is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size = len(data)
        info.mode = 0o644
    return info


def source_date_epoch(environ: Mapping[str, str]) -> int:
    """Return SOURCE_DATE_EPOCH (reproducible-builds.org) or 0 when it is unset."""
    raw = environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()):
        raise AuthoringError(f"SOURCE_DATE_EPOCH must be a non-negative integer, not {raw!r}")
    return int(raw)


# ---- new ----------------------------------------------------------------------------------


def create_plugin(
    target: Path, *, name: str, plugin_type: str, plugin_id: str, author: str | None
) -> tuple[str, ...]:
    """Create `target` holding a working plugin of `plugin_type`; refuse an existing path."""
    files = scaffold.render(plugin_type=plugin_type, name=name, plugin_id=plugin_id,
                            author=author)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.mkdir()
    except FileExistsError as exc:
        raise AuthoringError(f"{target} already exists; `new` only creates a new directory "
                             "(choose another with -o)") from exc
    try:
        for rel, text in files.items():
            _write_new(target / rel, text.encode("utf-8"), 0o644)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return tuple(files)


# ---- command line -------------------------------------------------------------------------


def _say(line: str = "") -> None:
    print(line, file=sys.stdout)


def _warn(command: str, message: str) -> None:
    print(f"{PROG} {command}: warning: {message}", file=sys.stderr)


def _fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 1


def _cmd_new(args: argparse.Namespace) -> int:
    plugin_id = args.id or scaffold.derive_id(args.name)
    if plugin_id is None:
        return _fail("new", f"cannot derive an id from {args.name!r}; pass --id "
                            f"(it must match {manifest_mod.ID_RE.pattern})")
    target = Path(args.output) if args.output else Path(plugin_id)
    files = create_plugin(target, name=args.name, plugin_type=args.type, plugin_id=plugin_id,
                          author=args.author)
    _say(f"created {args.type} plugin {plugin_id} in {target}/")
    for rel in files:
        _say(f"  {rel}")
    _say(f"next: cd {target} && python -m pytest -q, then `{PROG} validate {target}`")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    root = Path(args.path)
    report = validate_plugin(root)
    for finding in report.findings:
        _say(finding.render(root))
    counts = f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)"
    if report.errors or report.manifest is None:
        return _fail("validate", f"{root} is not a valid plugin: {counts}")
    m = report.manifest
    _say(f"{root}: ok: {m.id} {m.version} ({m.plugin_type}); plugin.sig will cover "
         f"{m.source} and {len(report.bundle.sources) if report.bundle else 0} Python "
         f"file(s); {counts}")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    pair = write_keypair(Path(args.out))
    _say(f"wrote {pair.private_path}  (private key, mode 0600: keep it secret, outside any "
         "plugin directory)")
    _say(f"wrote {pair.public_path}  (public key)")
    _say(f"public key: {pair.public_key.hex()}")
    _say(f"to trust it, copy {pair.public_path} into the daemon's trust.keys_dir as "
         "<key id>.pem (the file stem is the key id)")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    key_path = Path(args.private_key)
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        _warn("sign", f"{key_path} is readable by other users (mode {mode:04o}); "
                      f"chmod 600 {key_path}")
    plugin_dir = Path(args.plugin_dir)
    signed = sign_plugin(plugin_dir, read_private_key(key_path))
    out = Path(args.out) if args.out else plugin_dir / SIGNATURE_FILE
    _write_replace(out, signed.signature_file)
    m = signed.manifest
    _say(f"signed {m.id} {m.version}: wrote {out}")
    _say(f"digest: {signed.digest.hex()}")
    _say(f"public key: {signed.public_key.hex()}")
    _say(f"covers: {m.source} (minus signature, trust) and {len(signed.files)} Python "
         f"file(s): {', '.join(signed.files)}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    plugin_dir = Path(args.plugin_dir)
    result = verify_plugin(plugin_dir, Path(args.keys_dir))
    for skipped in result.skipped_keys:
        _warn("verify", f"{skipped.path} skipped: {skipped.message} [{skipped.code}]")
    d, m = result.decision, result.manifest
    _say(f"status: {d.status}")
    _say(f"key id: {d.key_id or '-'}")
    _say(f"plugin: {m.id} {m.version} ({m.plugin_type})")
    _say(f"digest: {d.digest_hex}")
    _say(f"checked: {m.source} (minus signature, trust) and {len(result.files)} Python "
         "file(s):")
    for rel in result.files:
        _say(f"  {rel}")
    _say(f"trusted keys: {', '.join(result.key_ids) or 'none'}")
    if d.status is SignatureStatus.VERIFIED:
        return 0
    _say(f"reason: {d.reason}")
    if d.status is SignatureStatus.INVALID:
        _say("note: plugin.sig signs one digest over all of the above, so it cannot tell which "
             f"file changed; compare the digest with the one `{PROG} sign` printed")
    hint = f"; sign it with `{PROG} sign`" if d.status is SignatureStatus.UNSIGNED else ""
    return _fail("verify", f"{plugin_dir} is not verified ({d.status}): {d.reason}{hint}")


def _cmd_package(args: argparse.Namespace) -> int:
    plugin_dir = Path(args.dir)
    package = build_package(plugin_dir, mtime=source_date_epoch(os.environ))
    out = Path(args.output) if args.output else Path(package.default_name())
    if out.resolve().is_relative_to(plugin_dir.resolve()):
        return _fail("package", f"{out} is inside the plugin directory; write the package "
                                "elsewhere with -o")
    if not package.signed:
        _warn("package", f"{plugin_dir} has no {SIGNATURE_FILE}: a strict-mode daemon refuses "
                         f"the plugin; run `{PROG} sign` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_replace(out, package.data)
    m = package.manifest
    _say(f"wrote {out}")
    _say(f"plugin: {m.id} {m.version} ({'signed' if package.signed else 'UNSIGNED'})")
    _say(f"entries: {len(package.members)} under {m.id}/")
    _say(f"sha256: {hashlib.sha256(package.data).hexdigest()}")
    return 0


def _plugin_id(value: str) -> str:
    if not manifest_mod.ID_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} must match {manifest_mod.ID_RE.pattern}")
    return value


def _one_line(value: str) -> str:
    if not value.strip() or not value.isprintable() or len(value) > 200:
        raise argparse.ArgumentTypeError(f"{value!r} must be one printable line of at most "
                                         "200 characters")
    return value.strip()


@dataclass(frozen=True, slots=True, kw_only=True)
class _Command:
    name: str
    help: str
    example: str
    handler: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]


def _args_new(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", type=_one_line, help="display name of the plugin")
    p.add_argument("--type", choices=sorted(manifest_mod.PLUGIN_TYPES), default="enricher",
                   help="plugin type (default: enricher)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="directory to create (default: ./<id>); must not exist")
    p.add_argument("--id", type=_plugin_id, help="manifest id (default: derived from NAME)")
    p.add_argument("--author", type=_one_line, help='manifest author, e.g. "Name <mail>"')


def _args_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="plugin directory")


def _args_keygen(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", required=True,
                   help="directory for signing.key and signing.pub (created if missing)")


def _args_sign(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin-dir", metavar="DIR", required=True, help="plugin directory")
    p.add_argument("--private-key", metavar="KEY", required=True,
                   help="Ed25519 PKCS#8 PEM private key (keygen's signing.key)")
    p.add_argument("--out", metavar="FILE", help="signature file (default: DIR/plugin.sig)")


def _args_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin-dir", metavar="DIR", required=True, help="plugin directory")
    p.add_argument("--keys-dir", metavar="DIR", required=True,
                   help="trusted public keys (*.pem, *.pub); key id = file stem")


def _args_package(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="plugin directory")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="archive to write (default: ./<id>-<version>.tar.gz)")


_COMMANDS = (
    _Command(name="new", help="create a plugin that loads and runs as generated",
             handler=_cmd_new, arguments=_args_new, example="""\
  aisoc plugin new "GeoIP Enricher" --type enricher --author "SecOps <secops@example.org>"
  cd geoip-enricher && python -m pytest -q"""),
    _Command(name="validate", help="check the manifest, code and layout; list every problem",
             handler=_cmd_validate, arguments=_args_validate, example="""\
  aisoc plugin validate ./geoip-enricher
exit status: 0 valid (warnings allowed), 1 problems found (each with file, line and field)"""),
    _Command(name="keygen", help="write an Ed25519 signing key pair",
             handler=_cmd_keygen, arguments=_args_keygen, example="""\
  aisoc plugin keygen --out ~/.aisoc
  # on the daemon host, trust it under the key id "secops":
  install -m 0644 signing.pub /opt/aisoc/plugin-keys/secops.pem"""),
    _Command(name="sign", help="write plugin.sig over the manifest and every *.py file",
             handler=_cmd_sign, arguments=_args_sign, example="""\
  aisoc plugin sign --plugin-dir ./geoip-enricher --private-key ~/.aisoc/signing.key"""),
    _Command(name="verify", help="check plugin.sig against trusted keys, as a strict daemon",
             handler=_cmd_verify, arguments=_args_verify, example="""\
  aisoc plugin verify --plugin-dir ./geoip-enricher --keys-dir /opt/aisoc/plugin-keys
exit status: 0 verified, 1 unsigned or invalid (the reason is printed)"""),
    _Command(name="package", help="write a reproducible .tar.gz of the plugin",
             handler=_cmd_package, arguments=_args_package, example="""\
  aisoc plugin package ./geoip-enricher -o dist/geoip-enricher-0.1.0.tar.gz
  SOURCE_DATE_EPOCH=1700000000 aisoc plugin package ./geoip-enricher   # entry mtimes"""),
)


def build_parser() -> argparse.ArgumentParser:
    """Return the `aisoc plugin` parser; each subcommand's --help ends with an example."""
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Author AiSOC plugins: scaffold, check, sign, verify and package them.",
        epilog="typical flow: new -> validate -> keygen -> sign -> verify -> package\n"
               f"run `{PROG} COMMAND --help` for an example of each")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        sub = commands.add_parser(
            command.name, help=command.help, description=command.help, allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="example:\n" + command.example)
        command.arguments(sub)
        sub.set_defaults(handler=command.handler)
    return parser


def main(argv: Sequence[str]) -> int:
    """Run `aisoc plugin ARGV...`; return 0 on success, 1 when it failed, 2 on a usage error."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except PluginDError as exc:
        return _fail(args.command, exc.message)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args.command, f"{where}{exc.strerror or exc}")
