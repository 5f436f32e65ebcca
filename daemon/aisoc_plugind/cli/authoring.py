"""Run the authoring commands: `aisoc plugin new|validate|keygen|sign|verify|package|push|pull`.

The work is done by the authoring package (and the OCI client for `push`, the daemon's own
install code for `pull`); this module only
turns argv into calls and results into lines for the author.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from aisoc_plugind.authoring import scaffold
from aisoc_plugind.authoring.keys import read_private_key, write_keypair
from aisoc_plugind.authoring.layout import write_file
from aisoc_plugind.authoring.packaging import build_package, source_date_epoch
from aisoc_plugind.authoring.signer import sign_plugin, verify_plugin
from aisoc_plugind.authoring.validate import Finding, Report, validate_plugin
from aisoc_plugind.cli.tree import Command, CommandFailed, say, warn
from aisoc_plugind.core import manifest as manifest_mod
from aisoc_plugind.core.signing import SignatureStatus, TrustMode
from aisoc_plugind.delivery.oci import pull_package, push_package, push_reference
from aisoc_plugind.delivery.reference import parse_reference
from aisoc_plugind.engine.bundle import SIGNATURE_FILE
from aisoc_plugind.engine.install import PulledPlugin, pull_verified
from aisoc_plugind.engine.keyring import load_keyring
from aisoc_plugind.errors import OciReferenceError, PluginDError

__all__ = ["PLUGIN_COMMANDS", "PROG"]

PROG = "aisoc plugin"


def _cmd_new(args: argparse.Namespace) -> int:
    plugin_id = args.id or scaffold.derive_id(args.name)
    if plugin_id is None:
        raise CommandFailed(
            f"cannot derive an id from {args.name!r}; pass --id "
            f"(it must match {manifest_mod.ID_RE.pattern})"
        )
    target = Path(args.output) if args.output else Path(plugin_id)
    files = scaffold.create_plugin(
        target, name=args.name, plugin_type=args.type, plugin_id=plugin_id, author=args.author
    )
    say(f"created {args.type} plugin {plugin_id} in {target}/")
    for rel in files:
        say(f"  {rel}")
    say(f"next: cd {target} && python -m pytest -q, then `{PROG} validate {target}`")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    root = Path(args.path)
    report = validate_plugin(root)
    if args.json:
        return _validate_json(root, report)
    for finding in report.findings:
        say(finding.render(root))
    counts = f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)"
    if report.errors or report.manifest is None:
        raise CommandFailed(f"{root} is not a valid plugin: {counts}")
    m = report.manifest
    say(
        f"{root}: ok: {m.id} {m.version} ({m.plugin_type}); plugin.sig will cover "
        f"{m.source} and {len(report.bundle.sources) if report.bundle else 0} Python "
        f"file(s); {counts}"
    )
    return 0


def _validate_json(root: Path, report: Report) -> int:
    """Print the report as one JSON object; exit 1 when the plugin is not valid."""
    m = report.manifest
    ok = not report.errors and m is not None
    doc = {
        "path": str(root),
        "valid": ok,
        "plugin_id": m.id if m else None,
        "version": m.version if m else None,
        "plugin_type": m.plugin_type if m else None,
        "manifest_file": m.source if m else None,
        "python_files": list(report.bundle.sources) if report.bundle else [],
        "errors": [_finding_json(f) for f in report.errors],
        "warnings": [_finding_json(f) for f in report.warnings],
    }
    say(json.dumps(doc, sort_keys=True))
    return 0 if ok else 1


def _finding_json(finding: Finding) -> dict[str, Any]:
    return {
        "code": finding.code,
        "message": finding.message,
        "path": finding.path,
        "line": finding.line,
        "field": finding.field,
    }


def _cmd_keygen(args: argparse.Namespace) -> int:
    pair = write_keypair(Path(args.out))
    say(
        f"wrote {pair.private_path}  (private key, mode 0600: keep it secret, outside any "
        "plugin directory)"
    )
    say(f"wrote {pair.public_path}  (public key)")
    say(f"public key: {pair.public_key.hex()}")
    say(
        f"to trust it, copy {pair.public_path} into the daemon's trust.keys_dir as "
        "<key id>.pem (the file stem is the key id)"
    )
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    key_path = Path(args.private_key)
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        warn(
            f"{PROG} sign",
            f"{key_path} is readable by other users (mode {mode:04o}); chmod 600 {key_path}",
        )
    plugin_dir = Path(args.plugin_dir)
    signed = sign_plugin(plugin_dir, read_private_key(key_path))
    out = Path(args.out) if args.out else plugin_dir / SIGNATURE_FILE
    write_file(out, signed.signature_file)
    m = signed.manifest
    say(f"signed {m.id} {m.version}: wrote {out}")
    say(f"digest: {signed.digest.hex()}")
    say(f"public key: {signed.public_key.hex()}")
    say(
        f"covers: {m.source} (minus signature, trust) and {len(signed.files)} Python "
        f"file(s): {', '.join(signed.files)}"
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    plugin_dir = Path(args.plugin_dir)
    try:
        result = verify_plugin(plugin_dir, Path(args.keys_dir))
    except PluginDError as exc:
        if not args.json:
            raise
        doc = {"path": str(plugin_dir), "status": "error", "verified": False}
        say(json.dumps({**doc, "code": exc.code, "reason": exc.message}, sort_keys=True))
        return 1
    for skipped in result.skipped_keys:
        warn(f"{PROG} verify", f"{skipped.path} skipped: {skipped.message} [{skipped.code}]")
    d, m = result.decision, result.manifest
    if args.json:
        say(
            json.dumps(
                {
                    "path": str(plugin_dir),
                    "status": str(d.status),
                    "verified": d.status is SignatureStatus.VERIFIED,
                    "key_id": d.key_id,
                    "plugin_id": m.id,
                    "version": m.version,
                    "digest": d.digest_hex,
                    "files": list(result.files),
                    "trusted_keys": list(result.key_ids),
                    "reason": None if d.status is SignatureStatus.VERIFIED else d.reason,
                },
                sort_keys=True,
            )
        )
        return 0 if d.status is SignatureStatus.VERIFIED else 1
    say(f"status: {d.status}")
    say(f"key id: {d.key_id or '-'}")
    say(f"plugin: {m.id} {m.version} ({m.plugin_type})")
    say(f"digest: {d.digest_hex}")
    say(f"checked: {m.source} (minus signature, trust) and {len(result.files)} Python file(s):")
    for rel in result.files:
        say(f"  {rel}")
    say(f"trusted keys: {', '.join(result.key_ids) or 'none'}")
    if d.status is SignatureStatus.VERIFIED:
        return 0
    say(f"reason: {d.reason}")
    if d.status is SignatureStatus.INVALID:
        say(
            "note: plugin.sig signs one digest over all of the above, so it cannot tell which "
            f"file changed; compare the digest with the one `{PROG} sign` printed"
        )
    hint = f"; sign it with `{PROG} sign`" if d.status is SignatureStatus.UNSIGNED else ""
    raise CommandFailed(f"{plugin_dir} is not verified ({d.status}): {d.reason}{hint}")


def _cmd_package(args: argparse.Namespace) -> int:
    plugin_dir = Path(args.dir)
    package = build_package(plugin_dir, mtime=source_date_epoch(os.environ))
    out = Path(args.output) if args.output else Path(package.default_name())
    if out.resolve().is_relative_to(plugin_dir.resolve()):
        raise CommandFailed(
            f"{out} is inside the plugin directory; write the package elsewhere with -o"
        )
    if not package.signed:
        warn(
            f"{PROG} package",
            f"{plugin_dir} has no {SIGNATURE_FILE}: a strict-mode daemon "
            f"refuses the plugin; run `{PROG} sign` first",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, package.data)
    m = package.manifest
    say(f"wrote {out}")
    say(f"plugin: {m.id} {m.version} ({'signed' if package.signed else 'UNSIGNED'})")
    say(f"entries: {len(package.members)} under {m.id}/")
    say(f"sha256: {hashlib.sha256(package.data).hexdigest()}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    reference = push_reference(args.ref)
    insecure = [reference.registry] if args.insecure else []
    digest = push_package(
        args.file,
        args.ref,
        insecure_registries=insecure,
        ca_file=args.ca_file,
        docker_config=args.docker_config,
    )
    say(digest)
    print(f"{PROG} push: pushed {args.file.name} to {reference}@{digest}", file=sys.stderr)
    return 0


def _push_ref(value: str) -> str:
    try:
        push_reference(value)
    except OciReferenceError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc
    return value


def _registry_options(p: argparse.ArgumentParser) -> None:
    """Add how to reach a registry: plain HTTP, an extra CA, a Docker config's credentials."""
    p.add_argument(
        "--insecure",
        action="store_true",
        help="talk plain HTTP to this registry (local test registries only)",
    )
    p.add_argument(
        "--ca-file",
        metavar="PEM",
        type=Path,
        help="also trust the CA certificates in this PEM file (a registry with a private CA)",
    )
    p.add_argument(
        "--docker-config",
        metavar="FILE",
        type=Path,
        help="read registry credentials from this Docker config file (default: "
        "$DOCKER_CONFIG/config.json, else ~/.docker/config.json)",
    )


def _args_push(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", type=Path, help="the package to push")
    p.add_argument("ref", metavar="OCI_REF", type=_push_ref, help="HOST[:PORT]/REPOSITORY:TAG")
    _registry_options(p)


def _cmd_pull(args: argparse.Namespace) -> int:
    keys_dir = Path(args.keys_dir)
    if not keys_dir.is_dir():
        raise CommandFailed(f"{keys_dir}: no such keys directory [keys_dir_missing]")
    keyring = load_keyring(keys_dir)
    for skipped in keyring.skipped:
        warn(f"{PROG} pull", f"{skipped.path} skipped: {skipped.message} [{skipped.code}]")
    reference = parse_reference(args.ref)
    fetch = functools.partial(
        pull_package,
        insecure_registries=[reference.registry] if args.insecure else [],
        ca_file=args.ca_file,
        docker_config=args.docker_config,
    )
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        pulled = pull_verified(
            fetch, args.ref, args.dir, mode=TrustMode(args.trust_mode), keys=keyring.keys
        )
    except PluginDError as exc:
        raise CommandFailed(f"{exc.message} [{exc.code}]") from exc
    say(json.dumps(_pulled_json(args.ref, pulled)) if args.json else _pulled_line(pulled))
    return 0


def _pulled_json(ref: str, pulled: PulledPlugin) -> dict[str, object]:
    return {
        "plugin_id": pulled.plugin_id,
        "version": pulled.version,
        "oci_ref": ref,
        "digest": pulled.digest,
        "path": str(pulled.path),
        "signature_status": pulled.decision.status.value,
        "signing_key_id": pulled.decision.key_id,
    }


def _pulled_line(pulled: PulledPlugin) -> str:
    d = pulled.decision
    by = f" by key {d.key_id}" if d.key_id else ""
    return (
        f"pulled {pulled.plugin_id} {pulled.version} ({pulled.digest}) into {pulled.path}: "
        f"{d.status.value}{by}"
    )


def _oci_ref(value: str) -> str:
    try:
        parse_reference(value)
    except OciReferenceError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc
    return value


def _args_pull(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ref", metavar="OCI_REF", type=_oci_ref, help="HOST[:PORT]/REPOSITORY@sha256:... or :TAG"
    )
    p.add_argument(
        "dir", metavar="DIR", type=Path, help="the plugin lands in DIR/<id> (created if missing)"
    )
    p.add_argument(
        "--keys-dir",
        metavar="K",
        required=True,
        help="trusted public keys (*.pem, *.pub); key id = file stem",
    )
    p.add_argument(
        "--trust-mode",
        metavar="M",
        choices=[m.value for m in TrustMode],
        default=TrustMode.STRICT.value,
        help="strict (default: only a trusted signature), warn or disabled, as the daemon's",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _registry_options(p)


def _plugin_id(value: str) -> str:
    if not manifest_mod.ID_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} must match {manifest_mod.ID_RE.pattern}")
    return value


def _one_line(value: str) -> str:
    if not value.strip() or not value.isprintable() or len(value) > 200:
        raise argparse.ArgumentTypeError(
            f"{value!r} must be one printable line of at most 200 characters"
        )
    return value.strip()


def _args_new(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", type=_one_line, help="display name of the plugin")
    p.add_argument(
        "--type",
        choices=sorted(manifest_mod.PLUGIN_TYPES),
        default="enricher",
        help="plugin type (default: enricher)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="directory to create (default: ./<id>); must not exist",
    )
    p.add_argument("--id", type=_plugin_id, help="manifest id (default: derived from NAME)")
    p.add_argument("--author", type=_one_line, help='manifest author, e.g. "Name <mail>"')


def _args_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="plugin directory")
    p.add_argument(
        "--json", action="store_true", help="print the findings as one JSON object on stdout"
    )


def _args_keygen(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        metavar="DIR",
        required=True,
        help="directory for signing.key and signing.pub (created if missing)",
    )


def _args_sign(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin-dir", metavar="DIR", required=True, help="plugin directory")
    p.add_argument(
        "--private-key",
        metavar="KEY",
        required=True,
        help="Ed25519 PKCS#8 PEM private key (keygen's signing.key)",
    )
    p.add_argument("--out", metavar="FILE", help="signature file (default: DIR/plugin.sig)")


def _args_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin-dir", metavar="DIR", required=True, help="plugin directory")
    p.add_argument(
        "--keys-dir",
        metavar="DIR",
        required=True,
        help="trusted public keys (*.pem, *.pub); key id = file stem",
    )
    p.add_argument(
        "--json", action="store_true", help="print the outcome as one JSON object on stdout"
    )


def _args_package(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="plugin directory")
    p.add_argument(
        "-o", "--output", metavar="FILE", help="archive to write (default: ./<id>-<version>.tar.gz)"
    )


PLUGIN_COMMANDS: tuple[Command, ...] = (
    Command(
        name="new",
        help="create a plugin that loads and runs as generated",
        run=_cmd_new,
        arguments=_args_new,
        example="""\
  aisoc plugin new "GeoIP Enricher" --type enricher --author "SecOps <secops@example.org>"
  cd geoip-enricher && python -m pytest -q""",
    ),
    Command(
        name="validate",
        help="check the manifest, code and layout; list every problem",
        run=_cmd_validate,
        arguments=_args_validate,
        example="""\
  aisoc plugin validate ./geoip-enricher
exit status: 0 valid (warnings allowed), 1 problems found (each with file, line and field)""",
    ),
    Command(
        name="keygen",
        help="write an Ed25519 signing key pair",
        run=_cmd_keygen,
        arguments=_args_keygen,
        example="""\
  aisoc plugin keygen --out ~/.aisoc
  # on the daemon host, trust it under the key id "secops":
  install -m 0644 signing.pub /opt/aisoc/plugin-keys/secops.pem""",
    ),
    Command(
        name="sign",
        help="write plugin.sig over the manifest and every *.py file",
        run=_cmd_sign,
        arguments=_args_sign,
        example="""\
  aisoc plugin sign --plugin-dir ./geoip-enricher --private-key ~/.aisoc/signing.key""",
    ),
    Command(
        name="verify",
        help="check plugin.sig against trusted keys, as a strict daemon",
        run=_cmd_verify,
        arguments=_args_verify,
        example="""\
  aisoc plugin verify --plugin-dir ./geoip-enricher --keys-dir /opt/aisoc/plugin-keys
exit status: 0 verified, 1 unsigned or invalid (the reason is printed)""",
    ),
    Command(
        name="package",
        help="write a reproducible .tar.gz of the plugin",
        run=_cmd_package,
        arguments=_args_package,
        example="""\
  aisoc plugin package ./geoip-enricher -o dist/geoip-enricher-0.1.0.tar.gz
  SOURCE_DATE_EPOCH=1700000000 aisoc plugin package ./geoip-enricher   # entry mtimes""",
    ),
    Command(
        name="push",
        help="push a package to an OCI registry; print the manifest digest",
        run=_cmd_push,
        arguments=_args_push,
        example="""\
  aisoc plugin push shodan-1.2.0.tar.gz ghcr.io/myorg/aisoc-plugins/shodan:1.2.0
  aisoc plugin push shodan-1.2.0.tar.gz 127.0.0.1:5000/aisoc/shodan:1.2.0 --insecure
  aisoc plugin push shodan-1.2.0.tar.gz reg.internal:5000/aisoc/shodan:1.2.0 \\
      --ca-file /etc/ssl/private-ca.pem --docker-config ./ci-docker-config.json""",
    ),
    Command(
        name="pull",
        help="pull, extract and verify a plugin into DIR/<id> (no daemon needed)",
        run=_cmd_pull,
        arguments=_args_pull,
        example="""\
  aisoc plugin pull ghcr.io/myorg/aisoc-plugins/shodan@sha256:<digest> /opt/aisoc/plugins \\
      --keys-dir /opt/aisoc/plugin-keys
exit status: 0 pulled and verified, 1 refused or failed (nothing is left in DIR)""",
    ),
)
