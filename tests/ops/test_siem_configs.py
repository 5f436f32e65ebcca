"""docs/siem/ shipper examples (Filebeat, Fluent Bit, Vector): the settings the README relies on.

These shippers are not installed here, so their files are parsed and checked, not run (the
rsyslog configuration is run for real by test_rsyslog.py).
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

import yaml

from aisoc_plugind.config.settings import Settings
from tests.ops.shipped import SIEM

AUDIT = Settings().audit_path
AUDIT_ENV_DIR = re.compile(r"\$\{AISOC_AUDIT_DIR:-?(?P<default>[^}]+)\}")


def _expand(path: str) -> str:
    """Replace `${AISOC_AUDIT_DIR:default}` (Filebeat) or `:-default` (Vector) by the default."""
    return AUDIT_ENV_DIR.sub(lambda m: m["default"], path)


def _filebeat_input() -> dict[str, Any]:
    config = yaml.safe_load((SIEM / "filebeat.yml").read_text())
    (audit_input,) = config["filebeat.inputs"]
    assert isinstance(audit_input, dict)
    return audit_input


def _fluent_bit(name: str) -> list[tuple[str, dict[str, str]]]:
    """Parse Fluent Bit's classic format: `[SECTION]` then `Key Value` lines."""
    sections: list[tuple[str, dict[str, str]]] = []
    for raw in (SIEM / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            sections.append((line[1:-1], {}))
            continue
        key, _, value = line.partition(" ")
        sections[-1][1][key.lower()] = value.strip()
    return sections


def _section(sections: list[tuple[str, dict[str, str]]], name: str) -> dict[str, str]:
    (found,) = [body for section, body in sections if section == name]
    return found


def _vector() -> dict[str, Any]:
    with (SIEM / "vector.toml").open("rb") as fh:
        return tomllib.load(fh)


def test_filebeat_reads_the_audit_file_and_its_rotations_not_the_gzipped_ones() -> None:
    """The live file and audit.jsonl-* are read; `.gz` files are excluded."""
    audit_input = _filebeat_input()
    paths = [_expand(p) for p in audit_input["paths"]]
    assert paths == [str(AUDIT), f"{AUDIT}-*"]
    assert audit_input["prospector.scanner.exclude_files"] == [r"\.gz$"]


def test_filebeat_identifies_files_by_fingerprint() -> None:
    """Fingerprint identity (not inode), over the first 64 bytes, with a stable input id."""
    audit_input = _filebeat_input()
    assert audit_input["type"] == "filestream" and audit_input["id"]
    assert audit_input["prospector.scanner.fingerprint.enabled"] is True
    assert audit_input["prospector.scanner.fingerprint.length"] == 64
    assert "file_identity.fingerprint" in audit_input


def test_filebeat_parses_json_keeping_the_raw_line_and_dedupes_on_it() -> None:
    """decode_json_fields leaves `message` (the chained bytes); _id is a hash of it."""
    processors = {next(iter(p)): p[next(iter(p))] for p in _filebeat_input()["processors"]}
    assert processors["decode_json_fields"]["fields"] == ["message"]
    assert processors["decode_json_fields"]["target"] == "aisoc"
    assert processors["fingerprint"] == {
        "fields": ["message"],
        "target_field": "@metadata._id",
        "method": "sha256",
    }


def test_fluent_bit_tails_the_audit_file_with_offsets_on_disk() -> None:
    """tail on the live file, from its head, a DB of offsets, filesystem chunks, Rotate_Wait."""
    tail = _section(_fluent_bit("fluent-bit.conf"), "INPUT")
    assert tail["name"] == "tail" and tail["path"] == str(AUDIT)
    assert tail["db"] and tail["read_from_head"] == "true"
    assert tail["storage.type"] == "filesystem"
    assert int(tail["rotate_wait"]) >= 30
    assert int(tail["buffer_max_size"].removesuffix("k")) * 1024 > 8192


def test_fluent_bit_parses_json_keeping_the_raw_line() -> None:
    """The parser filter keeps `log` (Preserve_Key) with a parser defined in the parsers file."""
    sections = _fluent_bit("fluent-bit.conf")
    parser_filter = _section(sections, "FILTER")
    assert parser_filter["key_name"] == "log"
    assert parser_filter["preserve_key"] == "on" and parser_filter["reserve_data"] == "on"
    assert _section(sections, "SERVICE")["parsers_file"] == "fluent-bit-parsers.conf"
    parser = _section(_fluent_bit("fluent-bit-parsers.conf"), "PARSER")
    assert parser["name"] == parser_filter["parser"]
    assert parser["format"] == "json" and parser["time_key"] == "timestamp"


def test_vector_reads_the_audit_file_by_checksum_fingerprint() -> None:
    """The live file and rotations (not .gz), from the beginning, identified by checksum."""
    source = _vector()["sources"]["aisoc_audit"]
    assert source["type"] == "file" and source["read_from"] == "beginning"
    assert [_expand(p) for p in source["include"]] == [str(AUDIT), f"{AUDIT}-*"]
    assert [_expand(p) for p in source["exclude"]] == [f"{AUDIT.parent}/*.gz"]
    assert source["fingerprint"]["strategy"] == "checksum"


def test_vector_parses_json_keeping_the_raw_line_and_buffers_on_disk() -> None:
    """The remap parses `.message` into `.aisoc` (never rewriting `.message`); disk buffer."""
    config = _vector()
    remap = config["transforms"]["aisoc_parse"]["source"]
    assert "parse_json!(string!(.message))" in remap
    assert not re.search(r"^\s*\.message\s*=", remap, re.MULTILINE)
    sink = config["sinks"]["siem"]
    assert sink["buffer"]["type"] == "disk"
    assert sink["acknowledgements"]["enabled"] is True
