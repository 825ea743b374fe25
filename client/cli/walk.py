"""The walk of a directory tree in sorted id order, one directory listing held per level
(local directories in :mod:`.sources`, fsspec ones in :mod:`.remote`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


def sorted_walk(
    root: Any, listing: Callable[[Any], list[str]], join: Callable[[Any, str], Any]
) -> Iterator[tuple[str, Any]]:
    """``(id, location)`` depth first, where ``listing(directory)`` gives the sorted names
    of a directory's files and subdirectories (these ending in ``/``): the ids come out in
    sorted order, one listing held per level."""
    stack = [(root, "", iter(listing(root)))]
    while stack:
        directory, rel, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
        elif name.endswith("/"):
            sub = join(directory, name[:-1])
            stack.append((sub, rel + name, iter(listing(sub))))
        else:
            yield rel + name, join(directory, name)
