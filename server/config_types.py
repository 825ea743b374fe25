"""Config-file values checked against the settings' declared types, before anything is built.

TOML gives strings, integers, floats, booleans, arrays and tables; a value of the wrong kind used
to pass straight into the frozen dataclasses, where `allow_random = "false"` (a string, so
truthy) silently served random weights and `max_batch_size = "8"` failed only deep in a worker.
Here every key of a [server], [[models]] or [[heads]] table is checked against the field's type
hint and refused with the key, the type expected and the value given; an unknown key is refused
with the closest valid one. Strings from the environment and the command line are parsed by
settings._coerce instead (there, "false" is the way to write a boolean).
"""

from __future__ import annotations

import collections.abc
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what it accepts."""


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
