"""``layertap models``: the server's models, one table row each."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import Subcommands, format_table

if TYPE_CHECKING:
    from .._sync import FeatureClient


def register(subcommands: Subcommands) -> None:
    """Add the ``models`` subcommand (one call from client/cli/__init__.py)."""
    subcommands.add("models", command, help="list the server's models")


def command(client: FeatureClient, args: argparse.Namespace) -> int:
    models = client.list_models()
    rows = [
        [
            m.name,
            m.architecture,
            m.weights,
            m.weights_sha256[:12],
            "x".join(str(s) for s in m.input_size),
            m.device,
            "yes" if m.ready else f"no ({m.status_message})" if m.status_message else "no",
        ]
        for m in models
    ]
    header = ["NAME", "ARCHITECTURE", "WEIGHTS", "SHA256", "INPUT", "DEVICE", "READY"]
    print(format_table(header, rows) if rows else "no models configured")
    return 0
