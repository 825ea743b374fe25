"""What the ``layertap`` subcommands share: argparse types, the subcommand registry, the
input and bulk argument groups, and the plain-text table they print.

Kept apart from client/cli/__init__.py, which imports every subcommand module, so those can
use these without importing it back.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._sync import FeatureClient

Command = Callable[["FeatureClient", argparse.Namespace], int]
"""A subcommand's handler: runs it with the connected client, returns the exit code."""


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


@dataclass(frozen=True)
class Subcommands:
    """The ``layertap`` subparsers, the parent parser of the options every client subcommand
    takes (--target, --timeout, --token, --tls-*), and the table of handlers by name."""

    sub: argparse._SubParsersAction[argparse.ArgumentParser]
    common: argparse.ArgumentParser
    handlers: MutableMapping[str, Command]

    def add(self, name: str, handler: Command, **parser_args: Any) -> argparse.ArgumentParser:
        """Add subcommand ``name`` (``parser_args``: help, description ...) run by
        ``handler``; returns its parser for the subcommand's own arguments."""
        self.handlers[name] = handler
        return self.sub.add_parser(name, parents=[self.common], **parser_args)


def add_input_arguments(parser: argparse.ArgumentParser, *, node_help: str) -> None:
    """IMAGE|DIR ..., --model and -n/--node (repeatable, into ``args.nodes``): what the
    subcommands that extract from files and directories read."""
    parser.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files or directories")
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "-n", "--node", action="append", required=True, dest="nodes", help=node_help
    )


def add_bulk_arguments(parser: argparse.ArgumentParser) -> None:
    """-r/--recursive, --batch-size and --concurrency of a bulk run over a folder."""
    parser.add_argument(
        "-r", "--recursive", action="store_true", help="also take images in subdirectories"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per request")
    parser.add_argument(
        "--concurrency", type=positive_int, default=4, help="requests in flight at once"
    )


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, trailing spaces stripped."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)
