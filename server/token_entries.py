"""The bearer-token entries of auth_tokens / auth_tokens_file, parsed once: each token, the
models it may use, and its weight in the fair queue. Torch-free, read by Settings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .config_types import ConfigError

WEIGHT = "weight="


@dataclass(frozen=True)
class TokenEntry:
    """One accepted token: its models (None: every model) and its fair-queuing weight."""

    token: str
    models: frozenset[str] | None
    weight: float = 1.0


def _weight(word: str, here: str) -> float:
    try:
        value = float(word[len(WEIGHT) :])
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.01 <= value <= 100):
        raise ConfigError(
            f"{here}: {word!r} is not a weight; write weight=N with N between 0.01 and 100 "
            "(a client's share of the worker relative to weight 1)"
        )
    return value


def parse_entries(entries: Sequence[tuple[str, str]]) -> dict[str, TokenEntry]:
    """(where, text) entries -> token -> TokenEntry. An entry is the token, then optionally
    `weight=N` and model names, separated by spaces; a word starting with '#' starts a comment.
    Tokens never contain spaces, so entries of the older one-token form read the same. A token
    listed twice must say the same both times (ConfigError, which never quotes the token)."""
    parsed: dict[str, TokenEntry] = {}
    where: dict[str, str] = {}
    for here, entry in entries:
        words = entry.split()
        comment = next((i for i, w in enumerate(words) if w.startswith("#")), len(words))
        if comment == 0:
            continue
        token, rest = words[0], words[1:comment]
        weights = [_weight(w, here) for w in rest if w.startswith(WEIGHT)]
        if len(weights) > 1:
            raise ConfigError(f"{here} gives its token {len(weights)} weights; give one")
        models = frozenset(w for w in rest if not w.startswith(WEIGHT)) or None
        found = TokenEntry(token, models, weights[0] if weights else 1.0)
        if token in parsed and parsed[token] != found:
            raise ConfigError(
                f"{here} repeats the token of {where[token]} with other models or another "
                "weight; give each token one entry"
            )
        parsed[token] = found
        where.setdefault(token, here)
    return parsed
