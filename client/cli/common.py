"""What the ``layertap`` subcommands share: argparse types, the subcommand registry, the
input and bulk argument groups, and the plain-text table they print.

Kept apart from client/cli/__init__.py, which imports every subcommand module, so those can
use these without importing it back.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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
    """IMAGE|DIR|LIST|URL ... (``args.images``), --list (``args.lists``), --model and -n/--node
    (repeatable, into ``args.nodes``): what the subcommands that extract from files,
    directories, lists and URLs read."""
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE|DIR|LIST|URL",
        help="image files, directories, lists (.txt: one path or URL per line; .parquet: a "
        "'path' or 'uri' column and an optional 'id' column) or URLs (s3://, gs://, az://, "
        "https://, file://; directories and globs too; needs layertap[fsspec])",
    )
    parser.add_argument(
        "--list",
        action="append",
        dest="lists",
        metavar="FILE",
        help="a list of images whatever its name: text (one path or URL per line) or Parquet; "
        "relative entries are relative to the list's folder (repeatable)",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "-n", "--node", action="append", required=True, dest="nodes", help=node_help
    )


def add_bulk_arguments(parser: argparse.ArgumentParser) -> None:
    """-r/--recursive, --batch-size, --concurrency, --read-threads, --read-ahead and
    --summary-json of a bulk run over a collection."""
    parser.add_argument(
        "-r", "--recursive", action="store_true", help="also take images in subdirectories"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per request")
    parser.add_argument(
        "--concurrency", type=positive_int, default=4, help="requests in flight at once"
    )
    parser.add_argument(
        "--read-threads",
        type=positive_int,
        default=8,
        metavar="N",
        help="images read at once (overlaps a slow disk or object store; default: 8)",
    )
    parser.add_argument(
        "--read-ahead",
        type=positive_int,
        default=32,
        metavar="N",
        help="images read ahead of the requests, in order, at most (default: 32)",
    )
    parser.add_argument(
        "--summary-json",
        type=Path,
        metavar="FILE",
        help="write the run's summary as JSON: added, already present, failed (with reasons), "
        "rows in the output, seconds, images/s",
    )


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, trailing spaces stripped."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)
