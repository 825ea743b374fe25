"""``layertap nodes MODEL``: a model's extractable nodes, as a list or (``--tree``) as the module
hierarchy with each graph node's shape.

Users know models by their modules (``features.22``), the server by graph nodes; the tree puts
both side by side, like torchinfo, so nobody has to read model source to find a layer name.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..types import ModelDescription, NodeInfo
from .common import Subcommands, format_table, positive_int

if TYPE_CHECKING:
    from .._sync import FeatureClient


def register(subcommands: Subcommands) -> None:
    """Add the ``nodes`` subcommand (one call from client/cli/__init__.py)."""
    nodes = subcommands.add("nodes", command, help="list a model's extractable nodes")
    nodes.add_argument("model")
    nodes.add_argument("--shapes", action="store_true", help="also show shape, dtype, layout")
    nodes.add_argument("--filter", metavar="SUBSTR", help="only nodes whose name contains this")
    nodes.add_argument(
        "--tree",
        action="store_true",
        help="the module hierarchy, with each module's type and output shape and layout",
    )
    nodes.add_argument(
        "--depth", type=positive_int, metavar="N", help="with --tree: show N levels at most"
    )


def command(client: FeatureClient, args: argparse.Namespace) -> int:
    desc = client.describe(args.model)
    if args.tree:
        rows = tree_rows(desc, substring=args.filter, max_depth=args.depth)
        print(format_table(["MODULE", "TYPE", "OUTPUT SHAPE", "LAYOUT"], rows))
        return 0
    nodes = [n for n in desc.nodes if not args.filter or args.filter in n.name]
    if args.shapes:
        rows = [[n.name, str(list(n.shape)), n.dtype, n.layout or "-"] for n in nodes]
        if rows:
            print(format_table(["NODE", "SHAPE", "DTYPE", "LAYOUT"], rows))
    else:
        for n in nodes:
            print(n.name)
    return 0


@dataclass
class _Entry:
    name: str
    kind: str
    node: NodeInfo | None = None
    """The graph node this entry is, or (for containers) the one its name resolves to."""
    children: list[_Entry] = field(default_factory=list)
    first_use: int = -1
    """Execution index of the first graph node in this subtree (-1: none)."""


def _parent_module(name: str, modules: set[str]) -> str:
    """The closest module path above a dotted node name ("" is the root)."""
    while "." in name:
        name = name.rsplit(".", 1)[0]
        if name in modules:
            return name
    return ""


def _last_under(prefix: str, nodes: Sequence[NodeInfo]) -> NodeInfo | None:
    """What ``--node prefix`` resolves to: the last node under that dotted prefix (the
    server's truncated-name rule), so a container shows the shape users would get."""
    depth = prefix.count(".") + 1
    for node in reversed(nodes):
        if ".".join(node.name.split(".")[:depth]) == prefix:
            return node
    return None


def _build(desc: ModelDescription) -> _Entry:
    modules = {m.name for m in desc.modules}
    by_name = {n.name: n for n in desc.nodes}
    order = {n.name: i for i, n in enumerate(desc.nodes)}
    root_type = next((m.type for m in desc.modules if m.name == ""), desc.model.architecture)
    root = _Entry("", root_type)
    entries: dict[str, _Entry] = {"": root}
    for m in desc.modules:
        if m.name == "":
            continue
        node = by_name.get(m.name) or _last_under(m.name, desc.nodes)
        entry = _Entry(m.name, m.type, node)
        if m.name in by_name:
            entry.first_use = order[m.name]
        entries[m.name] = entry
        entries[_parent_module(m.name, modules)].children.append(entry)
    for n in desc.nodes:
        if n.name in modules:
            continue
        # functions (add, flatten, mean) and second calls of a module (relu_1)
        kind = n.target if n.op == "call_module" else f"{n.target}()"
        entry = _Entry(n.name, kind, n, first_use=order[n.name])
        entries[_parent_module(n.name, modules)].children.append(entry)

    def settle(entry: _Entry) -> int:
        """Order children by first use; entries never used keep their place after the
        sibling before them, so registration order survives where execution says nothing."""
        previous = -1
        keyed: list[tuple[int, int, _Entry]] = []
        for i, child in enumerate(entry.children):
            used = settle(child)
            key = used if used >= 0 else previous
            previous = key
            keyed.append((key, i, child))
        keyed.sort(key=lambda t: (t[0], t[1]))
        entry.children = [c for _, _, c in keyed]
        uses = [u for u in (entry.first_use, *(c.first_use for c in entry.children)) if u >= 0]
        entry.first_use = min(uses) if uses else -1
        return entry.first_use

    settle(root)
    return root


def _keep(entry: _Entry, substring: str) -> bool:
    """Prune to entries matching ``substring`` and their ancestors; True if any is left."""
    entry.children = [c for c in entry.children if _keep(c, substring)]
    return bool(entry.children) or substring in entry.name


def tree_rows(
    desc: ModelDescription, *, substring: str | None = None, max_depth: int | None = None
) -> list[list[str]]:
    """[name (indented by depth), type, shape, layout] rows, depth first.

    ``substring`` keeps matching entries and their ancestors; ``max_depth`` hides deeper
    entries (the root is depth 0).
    """
    root = _build(desc)
    if substring:
        _keep(root, substring)
    rows: list[list[str]] = []

    def walk(entry: _Entry, depth: int) -> None:
        shape = str(list(entry.node.shape)) if entry.node is not None else ""
        layout = (entry.node.layout or "-") if entry.node is not None else ""
        rows.append(["  " * depth + (entry.name or "(model)"), entry.kind, shape, layout])
        if max_depth is not None and depth >= max_depth:
            return
        for child in entry.children:
            walk(child, depth + 1)

    walk(root, 0)
    return rows
