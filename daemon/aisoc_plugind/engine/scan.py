"""Scan plugin directories: read, parse, hash, check the signature and, asked to, compile.

`scan()` is the CPU-heavy front half of loading a plugin version, as a pure function of a
directory and the trust inputs (mode and keys); nothing here runs plugin code. The engine
calls it in a worker thread for a few directories, and a `ScanPool` runs it in worker
processes for many (see `engine.scanpool`), so that a cold discovery uses every core. Its
result crosses the process boundary in the `to_wire` / `from_wire` shape (plain values for
`marshal`; compiled code objects as they are), and the supervisor validates the manifest
again when it rebuilds the result.

The compiled code is only a cache of `compile()` over the very bytes that were read and
verified here, made by the same interpreter (`MAGIC` must match), and it is never written to
disk: what runs is still exactly what the signature covers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import marshal
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, MappingProxyType
from typing import Any

import nacl.signing

from aisoc_plugind.core.config_schema import schema_valid
from aisoc_plugind.core.manifest import Manifest, validate
from aisoc_plugind.core.manifest import parse as parse_manifest
from aisoc_plugind.core.signing import SignatureStatus, TrustDecision, TrustMode, decide
from aisoc_plugind.core.signing import plugin_digest as digest_of
from aisoc_plugind.engine.bundle import Bundle, read_bundle
from aisoc_plugind.errors import BundleError, ManifestError, PluginLoadError, Problem

__all__ = [
    "MAGIC",
    "Scanned",
    "TrustInputs",
    "compile_sources",
    "frame",
    "from_wire",
    "make_state_dir",
    "scan",
    "to_wire",
    "unframe",
    "worker_main",
]

MAGIC = importlib.util.MAGIC_NUMBER  # compiled code crosses only between equal interpreters


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustInputs:
    """What a trust decision needs: the mode and the trusted keys (raw public key bytes)."""

    mode: TrustMode
    keys: Mapping[str, bytes]

    def verify_keys(self) -> dict[str, nacl.signing.VerifyKey]:
        """Return the keys as PyNaCl verify keys."""
        return {k: nacl.signing.VerifyKey(v) for k, v in self.keys.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class Scanned:
    """One directory, scanned: its bundle and manifest, or why it cannot be loaded.

    `decision` is set when the manifest parsed; `code` (compiled code per source file, when
    compiling was asked for and the decision allows loading) may miss files that do not
    compile: the importer then compiles them itself and reports the error.
    """

    path: Path
    bundle: Bundle | None = None
    manifest: Manifest | None = None
    error: BundleError | ManifestError | PluginLoadError | None = None
    decision: TrustDecision | None = None
    code: Mapping[str, CodeType] | None = None
    schema_checked: bool = False  # the manifest's config_schema passed its metaschema


def scan(
    path: Path,
    mode: TrustMode,
    keys: Mapping[str, nacl.signing.VerifyKey],
    *,
    compile_code: bool,
    state_root: Path | None = None,
) -> Scanned:
    """Scan one plugin directory (blocking: call it from a worker thread or process).

    With `state_root`, an admitted version's state directory `<state_root>/<id>/` is made
    here (mode 0700) when missing, so that a plugin host can start without making them all
    at once; failing to make it is left to the host's start, which reports it."""
    try:
        bundle = read_bundle(path)
    except OSError as exc:  # e.g. a subdirectory that cannot be listed
        return Scanned(
            path=path,
            error=BundleError(
                f"{path}: cannot read: {exc.strerror or exc}", code="bundle_unreadable"
            ),
        )
    except BundleError as exc:
        return Scanned(path=path, error=exc)
    try:
        manifest = parse_manifest(bundle.manifest_bytes, bundle.manifest_name)
    except ManifestError as exc:
        return Scanned(path=path, bundle=bundle, error=exc)
    digest = digest_of(manifest.plain, bundle.sources)
    decision = decide(digest=digest, signature_file=bundle.signature, keys=keys, mode=mode)
    code = compile_sources(bundle) if compile_code and decision.allowed else None
    if state_root is not None and decision.allowed:
        make_state_dir(state_root, manifest.id)
    return Scanned(
        path=path,
        bundle=bundle,
        manifest=manifest,
        decision=decision,
        code=code,
        # A refused version never loads: its (hostile, maybe costly) schema is not checked.
        schema_checked=decision.allowed and schema_valid(manifest.plain.get("config_schema")),
    )


def make_state_dir(state_root: Path, plugin_id: str) -> None:
    """Make `<state_root>/<plugin_id>/` (0700) unless it exists; errors are ignored here."""
    if not plugin_id or plugin_id in (".", "..") or "/" in plugin_id or "\0" in plugin_id:
        return  # never a valid id (the manifest check refuses these): nothing outside
    with contextlib.suppress(OSError):
        os.makedirs(state_root / plugin_id, mode=0o700, exist_ok=True)


def compile_sources(bundle: Bundle) -> dict[str, CodeType]:
    """Compile every source file that compiles (the importer reports the others)."""
    out: dict[str, CodeType] = {}
    for rel, data in bundle.sources.items():
        try:
            out[rel] = compile(data, str(bundle.path / rel), "exec", dont_inherit=True)
        except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
            continue
    return out


# ---- across a process boundary (marshal: plain values and code objects) ----------------


def to_wire(item: Scanned) -> tuple[Any, ...]:
    """Return `item` as plain values for marshal."""
    path = str(item.path)
    error = item.error
    if isinstance(error, ManifestError):
        problems = [(p.field, p.code, p.message) for p in error.problems]
        bundle = item.bundle
        assert bundle is not None
        return ("manifest_error", path, bundle.manifest_name, problems, *_bundle_wire(bundle))
    if error is not None:
        return ("error", path, type(error).__name__, error.code, error.message)
    assert item.bundle is not None
    assert item.manifest is not None
    assert item.decision is not None
    d = item.decision
    return (
        "ok",
        path,
        dict(item.manifest.plain),
        (d.status.value, d.key_id, d.allowed, d.reason, d.digest_hex),
        dict(item.code) if item.code is not None else None,
        item.schema_checked,
        *_bundle_wire(item.bundle),
    )


def _bundle_wire(bundle: Bundle) -> tuple[Any, ...]:
    return (bundle.manifest_name, bundle.manifest_bytes, bundle.signature, dict(bundle.sources))


def from_wire(wire: tuple[Any, ...]) -> Scanned:
    """Rebuild a `Scanned` from `to_wire`'s shape; the manifest is validated again here."""
    kind, path = wire[0], Path(wire[1])
    if kind == "error":
        _, _, name, code, message = wire
        cls = BundleError if name == "BundleError" else PluginLoadError
        return Scanned(path=path, error=cls(message, code=code))
    if kind == "manifest_error":
        _, _, source, problems, *bundle_wire = wire
        error = ManifestError(
            [Problem(field=f, code=c, message=m) for f, c, m in problems], source=source
        )
        return Scanned(path=path, bundle=_bundle(path, bundle_wire), error=error)
    _, _, manifest_json, decision, code, schema_checked, *bundle_wire = wire
    bundle = _bundle(path, bundle_wire)
    status, key_id, allowed, reason, digest_hex = decision
    return Scanned(
        path=path,
        bundle=bundle,
        manifest=validate(manifest_json, source=bundle.manifest_name, checked=True),
        decision=TrustDecision(
            status=SignatureStatus(status),
            key_id=key_id,
            allowed=allowed,
            reason=reason,
            digest_hex=digest_hex,
        ),
        code=code,
        schema_checked=bool(schema_checked),
    )


def _bundle(path: Path, wire: list[Any]) -> Bundle:
    manifest_name, manifest_bytes, signature, sources = wire
    return Bundle(
        path=path,
        manifest_name=manifest_name,
        manifest_bytes=manifest_bytes,
        signature=signature,
        sources=MappingProxyType(sources),
    )


_HEADER = struct.Struct(">I")


def frame(value: Any) -> bytes:
    """Encode one message: a 4-byte big-endian length, then marshal's bytes."""
    data = marshal.dumps(value)
    return _HEADER.pack(len(data)) + data


def unframe(data: bytes) -> Any:
    """Decode a message body (without its length prefix)."""
    return marshal.loads(data)  # noqa: S302 - our own worker process, the same interpreter


# ---- the worker process: `python -I -m aisoc_plugind.engine.scan` ----------------------


def worker_main() -> int:
    """Answer scan requests on stdin with results on stdout until stdin closes.

    First message out: `{"magic": MAGIC, "pid": ...}`. Each request: `{"job": n, "paths":
    [...], "mode": ..., "keys": {id: raw key}, "compile": bool, "state_root": path or
    None}`; each answer: `{"job": n,
    "items": [to_wire(...), ...]}` in the order of the paths. Nothing here runs plugin code.
    """
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(frame({"magic": MAGIC, "pid": os.getpid()}))
    stdout.flush()
    keys: dict[str, nacl.signing.VerifyKey] = {}
    raw_keys: dict[str, bytes] | None = None
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return 0
        (size,) = _HEADER.unpack(header)
        request = unframe(stdin.read(size))
        if request["keys"] != raw_keys:
            raw_keys = request["keys"]
            keys = {k: nacl.signing.VerifyKey(v) for k, v in request["keys"].items()}
        mode = TrustMode(request["mode"])
        root = request.get("state_root")
        state_root = Path(root) if isinstance(root, str) else None
        items = []
        for path in request["paths"]:
            try:
                found = scan(
                    Path(path),
                    mode,
                    keys,
                    compile_code=request["compile"],
                    state_root=state_root,
                )
            except Exception as exc:  # a bug here fails that directory, never the worker
                found = Scanned(
                    path=Path(path),
                    error=PluginLoadError(
                        f"scanning failed unexpectedly ({type(exc).__name__})",
                        code="plugin_load_error",
                    ),
                )
            items.append(to_wire(found))
        stdout.write(frame({"job": request["job"], "items": items}))
        stdout.flush()


if __name__ == "__main__":  # pragma: no cover - run as a worker process by ScanPool
    sys.exit(worker_main())
