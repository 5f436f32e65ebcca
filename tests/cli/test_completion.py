"""Shell completion generated from the parsers, exercised in a real bash; `--json` outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aisoc_plugind.cli.completion import bash_script
from aisoc_plugind.cli.main import aisoc_parser, plugind_parser, run_aisoc, run_plugind

BASH = Path("/bin/bash")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plugins"
pytestmark = pytest.mark.skipif(not BASH.exists(), reason="bash is not installed")


def complete(script: str, words: list[str], cwd: Path | None = None) -> list[str]:
    """Source `script` in bash, complete `words` (the last is the word being typed)."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    prog = words[0]
    program = (
        f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
        f"_{prog.replace('-', '_')}_complete\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n"
    )
    done = subprocess.run(
        [str(BASH), "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
    )
    return [line for line in done.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def aisoc_script() -> str:
    return bash_script(aisoc_parser())


@pytest.fixture(scope="module")
def plugind_script() -> str:
    return bash_script(plugind_parser())


def test_top_level_words(aisoc_script: str, plugind_script: str) -> None:
    assert set(complete(aisoc_script, ["aisoc", ""])) >= {"plugin", "plugins", "completion"}
    assert set(complete(plugind_script, ["aisoc-plugind", ""])) >= {
        "run",
        "check-config",
        "token",
        "audit",
        "completion",
    }


def test_every_authoring_command_including_push_and_pull(aisoc_script: str) -> None:
    words = complete(aisoc_script, ["aisoc", "plugin", ""])
    for name in ("new", "validate", "keygen", "sign", "verify", "package", "push", "pull"):
        assert name in words


def test_prefix_and_options_of_a_leaf(aisoc_script: str) -> None:
    assert complete(aisoc_script, ["aisoc", "plugins", "re"]) == ["reload"]
    assert "--allow-downgrade" in complete(aisoc_script, ["aisoc", "plugins", "reload", "--"])
    assert "--json" in complete(aisoc_script, ["aisoc", "plugin", "verify", "--"])


def test_options_before_the_command_do_not_lose_the_path(aisoc_script: str) -> None:
    words = complete(aisoc_script, ["aisoc", "plugins", "--json", "run", "--pa"])
    assert words == ["--payload"]


def test_choices_and_file_values(aisoc_script: str, plugind_script: str, tmp_path: Path) -> None:
    types = complete(aisoc_script, ["aisoc", "plugin", "new", "--type", "en"])
    assert types == ["enricher"]
    modes = complete(aisoc_script, ["aisoc", "plugin", "pull", "--trust-mode", ""])
    assert set(modes) == {"strict", "warn", "disabled"}
    (tmp_path / "config.toml").write_text("")
    files = complete(plugind_script, ["aisoc-plugind", "run", "--config", "con"], cwd=tmp_path)
    assert files == ["config.toml"]
    # a positional path of a leaf command completes files too
    (tmp_path / "my-plugin").mkdir()
    assert complete(aisoc_script, ["aisoc", "plugin", "validate", "my"], cwd=tmp_path) == [
        "my-plugin"
    ]


def test_the_command_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_aisoc(["completion", "bash"]) == 0
    assert capsys.readouterr().out.strip() == bash_script(aisoc_parser()).strip()
    assert run_plugind(["completion", "bash"]) == 0
    assert "complete -o filenames -F _aisoc_plugind_complete aisoc-plugind" in (
        capsys.readouterr().out
    )
    assert run_aisoc(["completion", "fish"]) == 2


def test_closed_pipe_exits_quietly() -> None:
    """`aisoc-plugind completion bash | head -1`: no error line, no traceback."""
    done = subprocess.run(
        [
            str(BASH),
            "-c",
            '"$0" -m aisoc_plugind completion bash | head -1 >/dev/null',
            sys.executable,
        ],
        capture_output=True,
        text=True,
    )
    assert done.stderr == ""


def test_validate_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_aisoc(["plugin", "validate", "--json", str(EXAMPLES / "shodan-enricher")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is True
    assert doc["plugin_id"] == "shodan-enricher"
    assert doc["errors"] == []
    assert run_aisoc(["plugin", "validate", "--json", str(tmp_path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is False
    assert "manifest_missing" in {e["code"] for e in doc["errors"]}


def test_verify_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    keys = EXAMPLES.parent / "keys"
    plugin = EXAMPLES / "shodan-enricher"
    args = ["plugin", "verify", "--json", "--plugin-dir", str(plugin), "--keys-dir", str(keys)]
    assert run_aisoc(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["status"], doc["verified"], doc["key_id"]) == ("verified", True, "example-signer")
    assert run_aisoc([*args[:4], str(plugin), "--keys-dir", str(tmp_path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "unsigned" or doc["verified"] is False
    assert doc["reason"]
    assert run_aisoc([*args[:4], str(tmp_path), "--keys-dir", str(keys)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["status"], doc["code"]) == ("error", "manifest_missing")
