"""Each setting's declaration (default, help, range) and the checks of config values against it.

TOML gives strings, integers, floats, booleans, arrays and tables; a value of the wrong kind used
to pass straight into the frozen dataclasses, where `allow_random = "false"` (a string, so
truthy) silently served random weights and `max_batch_size = "8"` failed only deep in a worker.
Here every key of a [server], [[models]] or [[heads]] table is checked against the field's type
hint and refused with the key, the type expected and the value given; an unknown key is refused
with the closest valid one. Strings from the environment and the command line are parsed by
coerce instead (there, "false" is the way to write a boolean).

A field is declared once, `port: int = setting(50051, "gRPC port", minimum=0, maximum=65535)`:
the help, range and choices ride in the dataclass field's metadata, so the CLI flags, the
LAYERTAP_* variables, --help and check_ranges all read the one declaration (plain dataclass
metadata rather than pydantic-settings keeps the server's install small).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what it accepts."""


def about(
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
    secret: bool = False,
    table: bool = False,
) -> dict[str, Any]:
    """The metadata of one setting: its one-line help, its allowed range or words, whether
    --print-config hides it (secret) and whether only a TOML table sets it (no flag, no env)."""
    limits = {"minimum": minimum, "maximum": maximum, "choices": choices}
    return {"help": help, **limits, "secret": secret, "table": table}


def setting(default: Any, help: str, **limits: Any) -> Any:
    """A dataclass field with its default and about(help, **limits); typed Any so that
    `port: int = setting(...)` type-checks like a plain default."""
    return dataclasses.field(default=default, metadata=about(help, **limits))


def allowed(meta: Mapping[str, Any]) -> str:
    """The range or words a field's metadata allows, in the words of an error message."""
    low, high, choices = meta.get("minimum"), meta.get("maximum"), meta.get("choices")
    if choices:
        return f"one of {choices}"
    if low is not None and high is not None:
        return f"in {low}..{high}"
    return f">= {low}" if low is not None else f"<= {high}" if high is not None else "anything"


def check_ranges(key: str, obj: Any) -> None:
    """Every set field of a settings dataclass inside its declared range or choices; a
    ConfigError names the key (`key` formats its name: "setting {!r}"), what it allows and the
    value given."""
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        low, high, choices = meta.get("minimum"), meta.get("maximum"), meta.get("choices")
        if value is None or isinstance(value, bool | tuple | Mapping):  # unset, or no scalar
            continue
        if (
            (choices and value not in choices)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise ConfigError(f"{key.format(f.name)} must be {allowed(meta)}, got {value!r}")


def coerce(name: str, value: Any, default: Any) -> Any:
    """A string (env/CLI) or TOML value as the type of the setting's default: "off", "no",
    "false" and "0" are booleans, a comma-separated string or a list is a tuple of strings."""
    kind = type(default) if default is not None else str
    if kind is tuple:  # a TOML list, or a comma-separated string from env/CLI
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"setting {name!r}: expected a list of strings, got {value!r}")
        return tuple(str(v).strip() for v in items if str(v).strip())
    try:
        if kind is bool:
            if isinstance(value, str):
                word = value.strip().lower()
                if word in ("1", "true", "yes", "on"):
                    return True
                if word in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(word)
            return bool(value)
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: cannot read {value!r} as {kind.__name__}") from exc


def closest(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the most similar known key, or ''."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def refuse_unknown(where: str, given: Iterable[str], known: Iterable[str]) -> None:
    """ConfigError naming every unknown key, each with the closest known key when one is near."""
    known = list(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        hints = "".join(closest(k, known) for k in unknown[:1])
        raise ConfigError(f"{where} has unknown keys {unknown}{hints}; known: {known}")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def matches(value: Any, tp: Any) -> bool:
    """Whether a TOML value fits the type hint (int is a float; bool is no number)."""
    if tp is Any:
        return True
    if _is_union(tp):
        return any(matches(value, arg) for arg in typing.get_args(tp) if arg is not type(None))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return all(any(matches(v, a) for a in args) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return isinstance(value, tp) if isinstance(tp, type) else True


def describe(tp: Any) -> str:
    """A type hint in the words of a config file."""
    if _is_union(tp):
        return " or ".join(describe(a) for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        return "a boolean (true or false, unquoted)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = " or ".join(_plural(a) for a in dict.fromkeys(args))
        return f"a list of {inner}"
    if typing.get_origin(tp) in (dict, collections.abc.Mapping):
        return "a table ({ key = value, ... })"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    words = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    if tp in words:
        return words[tp]
    if _is_union(tp):
        return " or ".join(_plural(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return "lists of " + " or ".join(_plural(a) for a in dict.fromkeys(args))
    return describe(tp)


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def check_table(
    where: str, table: Mapping[str, Any], hints: Mapping[str, Any], skip: Iterable[str] = ()
) -> None:
    """Every key of one config table known and of its field's type (module docstring)."""
    refuse_unknown(where, table, hints)
    for key, value in table.items():
        if key in skip:
            continue
        tp = hints[key]
        if not matches(value, tp):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise ConfigError(
                f"{where}: {key} must be {describe(tp)}, got {shown} ({_kind(value)})"
            )
