"""Check a plugin's configuration against its manifest's `config_schema`, fetching nothing."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.protocols
import jsonschema.validators
import referencing

__all__ = ["config_problem", "config_validator", "schema_valid"]


def config_validator(
    schema: dict[str, Any], *, checked: bool = False
) -> jsonschema.protocols.Validator:
    """Return a validator for a plugin's `config_schema` that never fetches anything.

    jsonschema still retrieves remote `$ref` URLs by default (deprecated, for backwards
    compatibility): a manifest could make the daemon send requests anywhere. An explicit empty
    registry resolves only references inside the schema itself. Raises SchemaError, unless
    `checked` (the schema passed `schema_valid` already; checking it against the metaschema
    is most of the cost).
    """
    if checked:
        text = _text_of(schema)
        if text is not None:
            return _validator_of_text(text)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    if not checked:
        cls.check_schema(schema)
    return cls(schema, registry=referencing.Registry())


def _text_of(schema: Any) -> str | None:
    try:
        return json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


# Many plugins share a schema, and building a validator costs more than using it: one
# validator per distinct (checked) schema text. Validators keep no state between calls that
# depends on the instance validated.
@functools.lru_cache(maxsize=1024)
def _validator_of_text(text: str) -> jsonschema.protocols.Validator:
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, registry=referencing.Registry())


def schema_valid(schema: Any) -> bool:
    """Return True when `schema` is a JSON Schema its metaschema accepts (no config needed:
    the scan of a plugin directory answers this, off the event loop)."""
    if not isinstance(schema, dict):
        return False
    text = _text_of(schema)
    return text is not None and _schema_text_valid(text)


@functools.lru_cache(maxsize=1024)  # many plugins share a schema; checking one costs ~0.5 ms
def _schema_text_valid(text: str) -> bool:
    schema = json.loads(text)
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except Exception:  # SchemaError, RecursionError, anything odd: not known good
        return False
    return True


def config_problem(
    schema: dict[str, Any], config: Mapping[str, Any], *, checked: bool = False
) -> str | None:
    """Return why `config` fails `schema` without quoting any config value, or None.

    Raises ValueError (with a reason) when the schema itself cannot be used: invalid, a
    `$ref` that does not resolve locally, or nested past the recursion limit. `checked`: see
    `config_validator`.
    """
    try:
        validator = config_validator(schema, checked=checked)
        error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    except jsonschema.exceptions.SchemaError as exc:
        raise ValueError(f"config_schema is not a valid JSON Schema: {exc.message}") from exc
    except RecursionError as exc:
        raise ValueError("config_schema refers to itself without end") from exc
    except Exception as exc:  # referencing's Unresolvable and friends (no public base class)
        raise ValueError(
            f"config_schema cannot be used ({type(exc).__name__}): only $refs "
            "inside the schema are resolved"
        ) from exc
    if error is None:
        return None
    # Never exc.message: it quotes the offending value, and config holds secrets.
    return f"{error.json_path} fails the schema keyword {error.validator!r}"
