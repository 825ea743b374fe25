"""The ``layertap`` command: start a server, or query one (models, nodes, extract, pictures,
compare, fit-whitening).

This module parses the global options, hands ``serve`` to the server and runs every other
subcommand with a connected client, turning failures into messages and exit codes; each
subcommand lives in a module of its own here and registers its parser and handler
(``register``). Client subcommands need only the client dependencies; ``serve`` imports the
server lazily so a client-only install still gets a helpful message instead of a torch
ImportError, and the picture commands import matplotlib (the ``viz`` extra) only when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from .._options import DEFAULT_TARGET
from .._security import tls_credentials
from .._sync import FeatureClient
from ..errors import FeatureServiceError
from . import compare, extract, models, nodes, pictures, whitening
from .common import Command, Subcommands, positive_float

_GLOBAL_WITH_VALUE = ("--target", "--timeout", "--token", "--tls-ca", "--tls-cert", "--tls-key")


def _default_target() -> str:
    return os.environ.get("LAYERTAP_TARGET") or DEFAULT_TARGET


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The parser, and the handler of each client subcommand by name."""
    handlers: dict[str, Command] = {}
    # Global options are accepted before or after the subcommand; SUPPRESS keeps a value given
    # before it from being reset by the subparser's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=argparse.SUPPRESS,
        help=f"server address host:port (default: $LAYERTAP_TARGET or {DEFAULT_TARGET})",
    )
    common.add_argument(
        "--timeout",
        type=positive_float,
        default=argparse.SUPPRESS,
        help="per-call deadline in seconds (default: 30)",
    )
    common.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="bearer token for a server with auth_tokens (default: $LAYERTAP_TOKEN; prefer the "
        "variable: command lines are visible to other users)",
    )
    common.add_argument(
        "--tls-ca",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PEM",
        help="CA bundle that signed the server certificate; any --tls-* option uses TLS "
        "(with only --tls-cert/--tls-key the system roots are trusted)",
    )
    common.add_argument(
        "--tls-cert",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PEM",
        help="client certificate, for servers requiring mutual TLS (with --tls-key)",
    )
    common.add_argument(
        "--tls-key",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PEM",
        help="private key of --tls-cert",
    )
    parser = argparse.ArgumentParser(
        prog="layertap",
        parents=[common],
        description="Serve or query intermediate layers of PyTorch vision models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "serve",
        add_help=False,
        help="start a server (needs `pip install layertap[server]`); "
        "all further arguments go to the server",
    )
    subcommands = Subcommands(sub, common, handlers)
    for module in (models, nodes, extract, pictures, whitening, compare):
        module.register(subcommands)  # in the order `layertap --help` lists them
    return parser, handlers


def _serve_args(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``serve`` if that is the subcommand, else None.

    Scanned by hand so every server option passes through untouched (argparse would try to
    interpret or abbreviate them).
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _GLOBAL_WITH_VALUE:
            i += 2
        elif any(arg.startswith(opt + "=") for opt in _GLOBAL_WITH_VALUE):
            i += 1
        else:
            return list(argv[i + 1 :]) if arg == "serve" else None
    return None


def _serve(args: list[str]) -> int:
    try:
        from layertap.server.app import main as serve_main
    except ImportError as exc:
        print(f"error: the server needs `pip install layertap[server]` ({exc})", file=sys.stderr)
        return 2
    code = serve_main(args)
    return int(code) if code is not None else 0


def _unreachable(exc: FeatureServiceError) -> bool:
    """UNAVAILABLE because nothing answered, as opposed to a server saying "still loading"."""
    if exc.code != grpc.StatusCode.UNAVAILABLE:
        return False
    text = exc.details.lower()
    return any(
        s in text
        for s in (
            "failed to connect",
            "connection refused",
            "connect failed",
            "dns resolution failed",
            "errors resolving",
            "lookup",
            "no address",
            "socket closed",
            "unreachable",
        )
    )


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    """FeatureClient keyword arguments for --token/$LAYERTAP_TOKEN and the --tls-* options."""
    options: dict[str, Any] = {}
    token = getattr(args, "token", None) or os.environ.get("LAYERTAP_TOKEN") or None
    if token is not None:
        options["token"] = token
    tls = {name: getattr(args, "tls_" + name, None) for name in ("ca", "cert", "key")}
    if any(v is not None for v in tls.values()):
        options["credentials"] = tls_credentials(**tls)
    return options


def _tls_failure(exc: FeatureServiceError) -> bool:
    """The connection most likely failed in the TLS handshake (wrong CA, host name, client
    certificate, or TLS on one side only): gRPC often reports these only as a closed socket."""
    if exc.code != grpc.StatusCode.UNAVAILABLE:
        return False
    text = exc.details.lower()
    if any(s in text for s in ("ssl", "handshake", "certificate", "tls")):
        return True
    return "socket closed" in text and "refused" not in text


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``layertap`` and ``python -m layertap.client``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args = _serve_args(argv)
    if serve_args is not None:
        return _serve(serve_args)
    parser, handlers = _build_parser()
    args = parser.parse_args(argv)
    target = getattr(args, "target", None) or _default_target()
    timeout = getattr(args, "timeout", None)
    options: dict[str, Any] = {}
    try:
        options = _client_options(args)
        if timeout:
            options["timeout"] = timeout
        with FeatureClient(target, **options) as client:
            return handlers[args.command](client, args)
    except FeatureServiceError as exc:
        if _tls_failure(exc) and "credentials" in options:
            print(
                f"error: TLS with {target} failed ({exc.details}).\n"
                "Check --tls-ca (the CA that signed the server certificate), that the server "
                "certificate names this host, and --tls-cert/--tls-key if the server requires "
                "client certificates.",
                file=sys.stderr,
            )
        elif _tls_failure(exc):
            print(
                f"error: the connection to {target} was closed ({exc.details}).\n"
                "If the server uses TLS, pass --tls-ca (and --tls-cert/--tls-key for mutual TLS).",
                file=sys.stderr,
            )
        elif exc.code == grpc.StatusCode.UNAUTHENTICATED:
            print(f"error: {exc}\nPass --token or set $LAYERTAP_TOKEN.", file=sys.stderr)
        elif _unreachable(exc):
            print(
                f"error: the server at {target} is not reachable ({exc.details}).\n"
                "Start one with `layertap serve`, or point --target / $LAYERTAP_TARGET at a "
                "running server.",
                file=sys.stderr,
            )
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
