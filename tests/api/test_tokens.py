"""Tokens: format, the tokens file, TokenStore reloads, and `aisoc-plugind token ...`."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from aisoc_plugind.api.tokens import (
    PERMISSIONS,
    TokenStore,
    bearer_token,
    denial_reason,
    new_token,
    token_hash,
    well_formed,
)
from aisoc_plugind.api.tokens_file import TokenEntry, parse_tokens, render_tokens
from aisoc_plugind.audit.names import API_TOKENS_LOADED
from aisoc_plugind.cli.main import run_plugind
from tests.api_fixtures import ECHO_ID, serve_api, write_tokens
from tests.conftest import Env, PluginFactory


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "tokens.toml"


@pytest.fixture(autouse=True)
def _etc(tokens_file: Path) -> None:
    tokens_file.parent.mkdir(mode=0o750)


def create(tokens_file: Path, name: str, perms: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run `token create` and return what it printed on stdout."""
    code = run_plugind(
        [
            "token",
            "create",
            "--tokens-file",
            str(tokens_file),
            "--name",
            name,
            "--permissions",
            perms,
        ]
    )
    assert code == 0, capsys.readouterr().err
    return capsys.readouterr().out


# ---- format --------------------------------------------------------------------------------


def test_new_tokens_are_prefixed_random_and_checksummed() -> None:
    """aisoc_pd_ + 43 url-safe chars + 8 hex of CRC-32; each one different."""
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert token.startswith("aisoc_pd_")
        assert len(token) == 60
        assert well_formed(token)


def test_a_typo_breaks_the_checksum() -> None:
    """Changing one character makes the token malformed (no lookup needed)."""
    token = new_token()
    typo = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    assert not well_formed(typo)
    assert not well_formed(token + "\n")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
        ("Bearer " + "x" * 600, None),
    ],
)
def test_bearer_parsing(header: str | None, token: str | None) -> None:
    """Only `Authorization: Bearer <token>` carries a token."""
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "token_missing"),
        ("", "token_missing"),
        ("Basic x", "token_malformed"),
        ("Bearer nope", "token_malformed"),
        (f"Bearer {new_token()}", "token_unknown"),
    ],
    ids=["none", "empty", "basic", "not-ours", "unknown"],  # stable: the token is random
)
def test_denial_reasons(header: str | None, reason: str) -> None:
    """The audit log tells a missing token from a malformed or unknown one."""
    assert denial_reason(header) == reason


def test_render_and_parse_round_trip() -> None:
    """The hand-written TOML writer produces what tomllib reads back, names quoted."""
    entries = {
        n: TokenEntry(
            name=n,
            sha256=token_hash(n),
            permissions=PERMISSIONS[:2],
            created="2026-01-01T00:00:00.000000Z",
        )
        for n in ("ops", "ci.bot", "a@b-c_d")
    }
    parsed, problems = parse_tokens(render_tokens(entries).encode())
    assert problems == []
    assert parsed == entries


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[tokens", "not valid TOML"),
        ('[tokens.x]\nsha256 = "abc"\npermissions = ["plugins:read"]', "sha256"),
        (f'[tokens.x]\nsha256 = "{"a" * 64}"\npermissions = ["plugins:all"]', "permissions"),
        (f'[tokens.x]\nsha256 = "{"a" * 64}"\npermissions = []', "permissions"),
        (f'[tokens."bad name"]\nsha256 = "{"a" * 64}"\npermissions = ["plugins:read"]', "name"),
        ("tokens = 5", "table"),
    ],
)
def test_damaged_entries_grant_nothing(text: str, problem: str) -> None:
    """A damaged entry is left out and reported (fail closed)."""
    entries, problems = parse_tokens(text.encode())
    assert entries == {}
    assert problem in " ".join(problems)


# ---- TokenStore ----------------------------------------------------------------------------


def test_store_authenticates_by_hash(tokens_file: Path) -> None:
    """A listed token authenticates with its permissions; others do not."""
    tokens = write_tokens(tokens_file, {"ops": ("plugins:read",)})
    store = TokenStore(tokens_file)
    principal = store.authenticate(f"Bearer {tokens['ops']}")
    assert principal is not None
    assert principal.name == "ops"
    assert principal.allows("plugins:read")
    assert not principal.allows("plugins:admin")
    assert store.authenticate(f"Bearer {new_token()}") is None
    assert store.authenticate(tokens["ops"]) is None  # scheme required


def test_store_notices_file_changes_without_a_signal(tokens_file: Path) -> None:
    """Rewriting the file (a new inode) is picked up on the next authentication."""
    first = write_tokens(tokens_file, {"ops": ("plugins:read",)})
    store = TokenStore(tokens_file)
    second = write_tokens(tokens_file, {"ops": ("plugins:read",)})
    assert store.authenticate(f"Bearer {first['ops']}") is None
    assert store.authenticate(f"Bearer {second['ops']}") is not None


def test_missing_file_refuses_everything(tokens_file: Path) -> None:
    """No tokens file: no tokens, one problem saying so."""
    store = TokenStore(tokens_file)
    assert len(store) == 0
    assert "does not exist" in store.problems[0]


def test_group_writable_file_is_not_trusted(tokens_file: Path) -> None:
    """A tokens file others can write would let them mint admin tokens: refused."""
    tokens = write_tokens(tokens_file, {"ops": ("plugins:admin",)})
    tokens_file.chmod(0o620)
    store = TokenStore(tokens_file)
    assert store.authenticate(f"Bearer {tokens['ops']}") is None
    assert "writable by group or others" in store.problems[0]


# ---- the CLI -------------------------------------------------------------------------------


def test_create_prints_only_the_token_and_stores_only_its_hash(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """stdout is the token and a newline; the file (0600) holds its hash, not the token."""
    out = create(tokens_file, "ops", "plugins:read,plugins:execute", capsys)
    token = out.removesuffix("\n")
    assert out == token + "\n"
    assert well_formed(token)
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    text = tokens_file.read_text()
    assert token not in text
    assert token_hash(token) in text
    principal = TokenStore(tokens_file).authenticate(f"Bearer {token}")
    assert principal is not None
    assert principal.permissions == {"plugins:read", "plugins:execute"}


def test_create_keeps_0600_and_other_tokens(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second create rewrites atomically, keeps the first token and mode 0600."""
    first = create(tokens_file, "a", "plugins:read", capsys).strip()
    second = create(tokens_file, "b", "plugins:admin", capsys).strip()
    store = TokenStore(tokens_file)
    assert store.names() == ["a", "b"]
    assert store.authenticate(f"Bearer {first}")
    assert store.authenticate(f"Bearer {second}")
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    assert [p.name for p in tokens_file.parent.iterdir()] == ["tokens.toml"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--name", "a", "--permissions", "plugins:root"], 1, "plugins:read, plugins:admin"),
        (["--name", "a", "--permissions", ""], 1, "choose from"),
        (["--name", "bad name", "--permissions", "plugins:read"], 1, "invalid token name"),
        (["--name", "a"], 2, "required"),
    ],
)
def test_create_refuses_bad_arguments(
    tokens_file: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, message: str
) -> None:
    """Unknown permissions list the valid ones (exit 1); missing arguments are usage (2)."""
    assert run_plugind(["token", "create", "--tokens-file", str(tokens_file), *args]) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err
    assert not tokens_file.exists()


def test_duplicate_name_is_refused(tokens_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Creating a name twice fails (exit 1) and leaves the first token valid."""
    token = create(tokens_file, "ops", "plugins:read", capsys).strip()
    assert (
        run_plugind(
            [
                "token",
                "create",
                "--tokens-file",
                str(tokens_file),
                "--name",
                "ops",
                "--permissions",
                "plugins:admin",
            ]
        )
        == 1
    )
    assert "exists already" in capsys.readouterr().err
    assert TokenStore(tokens_file).authenticate(f"Bearer {token}") is not None


def test_list_never_shows_secrets_or_hashes(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """list (table and JSON) shows names, permissions, creation and expiry times only."""
    token = create(tokens_file, "ops", "plugins:read,plugins:admin", capsys).strip()
    assert run_plugind(["token", "list", "--tokens-file", str(tokens_file)]) == 0
    table = capsys.readouterr().out
    assert run_plugind(["token", "list", "--tokens-file", str(tokens_file), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["tokens"]
    assert listed[0]["name"] == "ops"
    assert listed[0]["permissions"] == ["plugins:read", "plugins:admin"]
    assert set(listed[0]) == {"name", "permissions", "created", "expires"}
    assert "ops" in table
    assert "plugins:read,plugins:admin" in table
    for shown in (table, json.dumps(listed)):
        assert token not in shown
        assert token_hash(token) not in shown


def test_tokens_file_defaults_to_the_environment(
    tokens_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --tokens-file, AISOC_PLUGIND_TOKENS_FILE names the file."""
    monkeypatch.setenv("AISOC_PLUGIND_TOKENS_FILE", str(tokens_file))
    assert run_plugind(["token", "create", "--name", "ops", "--permissions", "plugins:read"]) == 0
    assert run_plugind(["token", "list"]) == 0
    assert "ops" in capsys.readouterr().out


def test_revoke_unknown_name_fails(tokens_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Revoking a name that does not exist is exit 1."""
    create(tokens_file, "ops", "plugins:read", capsys)
    assert (
        run_plugind(["token", "revoke", "--tokens-file", str(tokens_file), "--name", "nope"]) == 1
    )
    assert "no token named" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """No action or an unknown one is a usage error; --help is success."""
    assert run_plugind(["token"]) == 2
    assert run_plugind(["token", "mint"]) == 2
    assert run_plugind(["token", "--help"]) == 0
    capsys.readouterr()


def test_a_damaged_file_is_not_overwritten(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """create refuses to rewrite a file it cannot parse (it would drop tokens)."""
    tokens_file.write_text("[tokens\n")
    assert (
        run_plugind(
            [
                "token",
                "create",
                "--tokens-file",
                str(tokens_file),
                "--name",
                "a",
                "--permissions",
                "plugins:read",
            ]
        )
        == 1
    )
    assert tokens_file.read_text() == "[tokens\n"
    assert capsys.readouterr().out == ""


# ---- against the live API ------------------------------------------------------------------


async def test_created_token_works_and_revoke_takes_effect_without_restart(
    env: Env, plugins: PluginFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """token create -> 200; token revoke -> 401 on the very next request; an event says so."""
    async with serve_api(env, plugins) as api:
        args = ["--tokens-file", str(api.tokens_file)]
        assert (
            run_plugind(
                ["token", "create", *args, "--name", "ops", "--permissions", "plugins:read"]
            )
            == 0
        )
        token = capsys.readouterr().out.strip()
        headers = {"Authorization": f"Bearer {token}"}
        assert (await api.client.get(f"/api/v1/plugins/{ECHO_ID}", headers=headers)).status == 200
        assert run_plugind(["token", "revoke", *args, "--name", "ops"]) == 0
        response = await api.client.get(f"/api/v1/plugins/{ECHO_ID}", headers=headers)
        loaded = api.events(API_TOKENS_LOADED)
        audit = api.audit_text()
    assert response.status == 401
    assert [e["trigger"] for e in loaded] == ["file_changed", "file_changed"]
    assert "ops" not in loaded[-1]["names"]
    assert token not in audit


def test_file_is_written_atomically(
    tokens_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed write leaves the old file intact and no temp file behind."""
    create(tokens_file, "a", "plugins:read", capsys)
    before = tokens_file.read_bytes()

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    assert (
        run_plugind(
            [
                "token",
                "create",
                "--tokens-file",
                str(tokens_file),
                "--name",
                "b",
                "--permissions",
                "plugins:read",
            ]
        )
        == 1
    )
    assert tokens_file.read_bytes() == before
    assert [p.name for p in tokens_file.parent.iterdir()] == ["tokens.toml"]
    assert capsys.readouterr().out == ""


# ---- expiry --------------------------------------------------------------------------------


def test_create_with_expiry_records_and_lists_it(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--expires-in 30d stores an RFC 3339 expiry that `token list` shows."""
    assert (
        run_plugind(
            [
                "token",
                "create",
                "--tokens-file",
                str(tokens_file),
                "--name",
                "ci",
                "--permissions",
                "plugins:execute",
                "--expires-in",
                "30d",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert run_plugind(["token", "list", "--tokens-file", str(tokens_file), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["tokens"][0]
    assert listed["expires"].endswith("Z") and listed["expires"] > listed["created"]


@pytest.mark.parametrize("duration", ["0d", "30", "1w", "-5d", "soon"])
def test_bad_expiry_is_a_usage_error(tokens_file: Path, duration: str) -> None:
    """Durations are 90d, 12h or 30m; anything else is exit 2."""
    assert (
        run_plugind(
            [
                "token",
                "create",
                "--tokens-file",
                str(tokens_file),
                "--name",
                "x",
                "--permissions",
                "plugins:read",
                "--expires-in",
                duration,
            ]
        )
        == 2
    )


def test_malformed_expiry_in_file_grants_nothing(tokens_file: Path) -> None:
    """An entry whose `expires` does not parse is ignored, not treated as never expiring."""
    tokens_file.write_text(
        '[tokens.a]\nsha256 = "' + "0" * 64 + '"\n'
        'permissions = ["plugins:read"]\nexpires = "tomorrow"\n'
    )
    entries, problems = parse_tokens(tokens_file.read_bytes())
    assert entries == {} and "expires" in problems[0]


async def test_expired_token_is_refused_with_its_reason(env: Env, plugins: PluginFactory) -> None:
    """A token past its expiry gets 401 and an api.denied event with reason token_expired."""
    from aisoc_plugind.api.tokens import new_token, token_hash
    from aisoc_plugind.api.tokens_file import TokenEntry, write_tokens_file

    async with serve_api(env, plugins) as api:
        token = new_token()
        write_tokens_file(
            api.tokens_file,
            {
                "old": TokenEntry(
                    name="old",
                    sha256=token_hash(token),
                    permissions=("plugins:read",),
                    created="2025-01-01T00:00:00.000000Z",
                    expires="2025-02-01T00:00:00.000000Z",
                )
            },
        )
        status, body = await api.json(
            "GET", "/api/v1/plugins", None, headers={"Authorization": f"Bearer {token}"}
        )
        denied = api.events("api.denied")
    assert status == 401 and "expired" in body["error"]["message"]
    assert denied[-1]["reason"] == "token_expired"
