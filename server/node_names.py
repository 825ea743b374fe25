"""A model's node names as clients type them: a truncated name resolves to the last node under
that dotted prefix (torchvision's rule), and an unknown one gets the closest valid names in
bounded time, whatever its length and the catalogue's size (the lookup runs on the event loop).
Torch-free."""

from __future__ import annotations

import bisect
import difflib
from collections.abc import Sequence

# "closest names" corrects each part of an unknown name among at most this many siblings, then
# compares the name with this many sorted neighbours on each side of the name and of its
# correction (NodeNames.closest): bounded work on the event loop per unknown name.
SUGGEST_PARTS = 64
SUGGEST_WINDOW = 8


def _around(names: list[str], name: str, window: int) -> list[str]:
    """The `window` sorted names on each side of where `name` would sort."""
    at = bisect.bisect_left(names, name)
    return names[max(0, at - window) : at + window]


class NodeNames:
    """The index of one catalogue's node names (in execution order) for resolution and
    suggestions."""

    def __init__(self, names: Sequence[str]) -> None:
        # every dotted prefix of a node name -> the last node under it (a truncated name's node)
        self.last_under: dict[str, str] = {}
        for name in names:  # execution order: the last node under a prefix wins
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                self.last_under[".".join(parts[:depth])] = name
        unique = set(names)
        prefixes = {".".join(n.split(".")[:k]) for n in unique for k in (1, 2)}
        # what "closest names" suggests from, sorted: node names and their 1- and 2-part prefixes
        self.suggestable = sorted(unique | prefixes)
        kids: dict[str, set[str]] = {}
        for name in unique:
            parts = name.split(".")
            for depth, part in enumerate(parts):
                kids.setdefault(".".join(parts[:depth]), set()).add(part)
        # each dotted prefix ("" for none) -> the next parts of the node names under it, sorted
        self.children = {prefix: sorted(parts) for prefix, parts in kids.items()}
        self.longest = max(map(len, self.suggestable), default=0)

    def closest(self, requested: str, n: int = 5) -> list[str]:
        """Up to n suggestable names close to `requested` (difflib ratio >= 0.5), in bounded
        time whatever the name and the catalogue: the name is corrected part by part (each
        part against at most SUGGEST_PARTS siblings), and difflib then compares it with the
        2 x SUGGEST_WINDOW sorted neighbours of the name and of its correction, never the whole
        catalogue (maxvit_t's 921 names took ~100 ms). A name over 3x the longest candidate,
        which no candidate can match at 0.5, is not compared at all."""
        if not requested or len(requested) > 3 * self.longest:
            return []
        prefix, corrected = "", []
        for part in requested.split("."):
            siblings = self.children.get(prefix)
            if not siblings:
                break
            if part not in siblings:
                near = _around(siblings, part, SUGGEST_PARTS // 2)
                best = difflib.get_close_matches(part, near, n=1, cutoff=0.3)
                if not best:
                    break
                part = best[0]
            corrected.append(part)
            prefix = ".".join(corrected)
        pool: set[str] = set()
        for variant in (requested, prefix):
            pool.update(_around(self.suggestable, variant, SUGGEST_WINDOW))
        return difflib.get_close_matches(requested, sorted(pool), n=n, cutoff=0.5)
