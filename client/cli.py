"""The ``layertap`` command: start a server, or query one (models, nodes, extract, pictures).

Client subcommands need only the client dependencies; ``serve`` imports the server lazily so
a client-only install still gets a helpful message instead of a torch ImportError, and the
picture commands import matplotlib (the ``viz`` extra) only when they run.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from . import _cli_compare, _cli_extract, _cli_whitening
from ._cli_args import (
    Command,
    Subcommands,
    add_bulk_arguments,
    add_input_arguments,
    positive_float,
    positive_int,
)
from ._cli_tree import tree_rows
from ._options import DEFAULT_TARGET, OUTPUT_DTYPES, POOLING
from ._security import tls_credentials
from ._sync import FeatureClient
from .errors import FeatureServiceError

_GLOBAL_WITH_VALUE = ("--target", "--timeout", "--token", "--tls-ca", "--tls-cert", "--tls-key")


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def _default_target() -> str:
    return os.environ.get("LAYERTAP_TARGET") or DEFAULT_TARGET


def _build_parser() -> argparse.ArgumentParser:
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
    sub.add_parser("models", parents=[common], help="list the server's models")

    nodes = sub.add_parser("nodes", parents=[common], help="list a model's extractable nodes")
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

    ext = sub.add_parser(
        "extract",
        parents=[common],
        help="extract activations of image files, or of whole directories (resumable)",
        description="Extract activations. Given only files (and no output or an .npz), one "
        "request is made and a summary printed. Given a directory, --recursive, or a "
        ".npy/.parquet output, every image is extracted with a progress bar into the output "
        "with its id (path relative to the directory); a rerun skips images already there.",
    )
    add_input_arguments(ext, node_help="node name (repeat for several)")
    ext.add_argument("--pool", choices=list(POOLING), default=None)
    ext.add_argument("--gem-p", type=positive_float, default=3.0)
    ext.add_argument("--normalize", action="store_true", help="L2-normalise each output")
    ext.add_argument(
        "--dtype",
        choices=OUTPUT_DTYPES,
        default="float32",
        help="int8: L2-normalised descriptors as round(127 x) (divide by 127 for [-1, 1])",
    )
    _cli_extract.add_descriptor_arguments(ext)
    ext.add_argument(
        "-o",
        "--output",
        type=Path,
        help="output file: .npz (ids + one array per node), .npy (one pooled node; ids in "
        "NAME.ids.txt) or .parquet (id + one list column per node; needs layertap[parquet])",
    )
    add_bulk_arguments(ext)
    ext.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=500,
        metavar="K",
        help="rewrite the output (atomically) every K new images, so an interrupted run "
        "keeps its work (default: 500)",
    )
    ext.add_argument("--no-progress", action="store_true", help="no progress bar")

    maps = sub.add_parser(
        "show-maps",
        parents=[common],
        help="picture of a node's feature maps and their mean over the photo (layertap[viz])",
    )
    maps.add_argument("image", type=Path, metavar="IMAGE")
    maps.add_argument("--model", required=True)
    maps.add_argument("-n", "--node", required=True)
    maps.add_argument(
        "--channels", type=positive_int, default=16, metavar="K", help="tiles (default: 16)"
    )
    maps.add_argument(
        "--top", action="store_true", help="the K most active channels instead of the first K"
    )
    maps.add_argument(
        "--max-size",
        type=positive_int,
        default=1024,
        metavar="PX",
        help="shrink the photo to this longer side first (default: 1024)",
    )
    maps.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")

    filters = sub.add_parser(
        "show-filters",
        parents=[common],
        help="picture of a conv layer's kernels (layertap[viz])",
    )
    filters.add_argument("model")
    filters.add_argument(
        "-n", "--node", required=True, help="conv layer (module path) or its weight's name"
    )
    filters.add_argument(
        "--count", type=positive_int, default=64, metavar="K", help="kernels shown (default: 64)"
    )
    filters.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    subcommands = Subcommands(sub, common, _COMMANDS)
    _cli_whitening.register(subcommands)
    _cli_compare.register(subcommands)
    return parser


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


def _cmd_models(client: FeatureClient, args: argparse.Namespace) -> int:
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
    print(_format_table(header, rows) if rows else "no models configured")
    return 0


def _cmd_nodes(client: FeatureClient, args: argparse.Namespace) -> int:
    desc = client.describe(args.model)
    if args.tree:
        rows = tree_rows(desc, substring=args.filter, max_depth=args.depth)
        print(_format_table(["MODULE", "TYPE", "OUTPUT SHAPE", "LAYOUT"], rows))
        return 0
    nodes = [n for n in desc.nodes if not args.filter or args.filter in n.name]
    if args.shapes:
        rows = [[n.name, str(list(n.shape)), n.dtype, n.layout or "-"] for n in nodes]
        if rows:
            print(_format_table(["NODE", "SHAPE", "DTYPE", "LAYOUT"], rows))
    else:
        for n in nodes:
            print(n.name)
    return 0


def _bulk(args: argparse.Namespace) -> bool:
    """Directories, --recursive, a .npy/.parquet output or an output a bulk run wrote mean the
    resumable bulk mode; plain files with an .npz (or no) output keep the one-request mode."""
    if args.recursive or any(Path(p).is_dir() for p in args.images):
        return True
    out: Path | None = args.output
    if out is None:
        return False
    if out.suffix.lower() in (".npy", ".parquet"):
        return True
    if out.suffix.lower() == ".npz" and out.is_file():
        try:
            with np.load(out, allow_pickle=False) as npz:
                return "ids" in npz.files
        except (OSError, ValueError, zipfile.BadZipFile):
            return False  # not an .npz at all: the one-request mode overwrites it, as before
    return False


def _cmd_extract(client: FeatureClient, args: argparse.Namespace) -> int:
    if _bulk(args):
        if args.output is None:
            raise ValueError("extracting a directory needs -o/--output (.npz, .npy or .parquet)")
        opts = _cli_extract.options_from_args(
            args,
            args.output,
            normalize=args.normalize,
            dtype=args.dtype,
            checkpoint_every=args.checkpoint_every,
            **_cli_extract.descriptor_options(args),
        )
        try:
            return _cli_extract.run(client, opts)
        except KeyboardInterrupt:
            return 130
    result = client.extract(
        [Path(p) for p in args.images],
        model=args.model,
        nodes=args.nodes,
        pool=args.pool,
        gem_p=args.gem_p,
        normalize=args.normalize,
        dtype=args.dtype,
        **_cli_extract.descriptor_options(args),
    )
    rows = _cli_extract.summary_rows(result)
    print(_format_table(["KEY", "SHAPE", "DTYPE", "NODE"], rows))
    meta = result.metadata
    print(
        f"model {meta.model} on {meta.device or '?'}: {len(result.per_image)} image(s), "
        f"{meta.timings.total_ms:.1f} ms server time"
    )
    if args.output is not None:
        path: Path = args.output
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")  # what np.savez would do; report it
        _save_npz(path, {key: result.array(key) for key in result})
        print(f"wrote {path}")
    return 0


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """What ``np.savez(path, **arrays)`` writes, without keys clashing with its parameters."""
    _cli_extract.write_npz(path, arrays)


def _load_photo(path: Path, max_size: int) -> np.ndarray:
    """The photo as uint8 RGB, upright (EXIF) and at most ``max_size`` on its longer side.

    Decoded here rather than on the server so the picture's pixels are exactly the ones the
    model saw; Pillow comes with matplotlib, so the viz extra needs nothing more.
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(path.read_bytes())) as opened:
        rgb = ImageOps.exif_transpose(opened).convert("RGB")
    if max(rgb.size) > max_size:
        rgb.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb)


def _cmd_show_maps(client: FeatureClient, args: argparse.Namespace) -> int:
    from . import viz

    viz.require_matplotlib()
    photo = _load_photo(args.image, args.max_size)
    common = {"model": args.model, "nodes": {args.node: "map"}, "pool": None}
    try:
        # The whole photo, not the centre crop: the heatmap then lines up with all of it.
        result = client.extract(photo, native_resolution=True, **common)
        shown = photo
    except FeatureServiceError as exc:
        if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        # Models with a fixed input size (ViT) refuse other sizes: overlay on the crop
        # the server's resize + centre crop keeps instead.
        result = client.extract(photo, **common)
        prep = result.metadata.preprocessing
        top, left, h, w = viz.crop_box(photo.shape[:2], prep.resize_size, prep.crop_size)
        shown = photo[top : top + h, left : left + w]
    maps = viz.to_chw(result["map"][0], result.layouts.get("map", ""))
    node = result.nodes.get("map", args.node)
    picture = viz.feature_maps_picture(
        maps,
        shown,
        args.output,
        count=args.channels,
        top=args.top,
        title=f"{args.model} {node}  {list(result.array('map').shape[1:])}"
        + ("  (most active channels)" if args.top else ""),
    )
    w, h = picture.size_px
    print(f"wrote {args.output} ({w}x{h}): channels {picture.channels} of {maps.shape[0]}")
    return 0


def _cmd_show_filters(client: FeatureClient, args: argparse.Namespace) -> int:
    from . import viz

    viz.require_matplotlib()
    node: str = args.node
    name = node if node.endswith(".weight") else node + ".weight"
    try:
        params = client.get_parameters(args.model, [name])
    except FeatureServiceError as exc:
        if exc.code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            raise
        # Often a container (features.0) whose conv sits one level down: say which.
        module = name.removesuffix(".weight")
        convs = [
            m.name
            for m in client.describe(args.model).modules
            if m.name.startswith(module + ".") and "Conv" in m.type and m.own_parameters
        ]
        if not convs:
            raise
        raise ValueError(
            f"{module} has no conv weight of its own; conv layers under it: "
            + ", ".join(convs[:8])
            + (" ..." if len(convs) > 8 else "")
        ) from None
    weight = params[name] if name in params else next(iter(params.values()))
    picture = viz.filters_picture(
        weight,
        args.output,
        count=args.count,
        name=name,
        title=f"{args.model} {name}  {list(weight.shape)}",
    )
    w, h = picture.size_px
    kind = "RGB" if picture.rgb else "mean over input channels"
    print(f"wrote {args.output} ({w}x{h}): {len(picture.tiles)} kernels, {kind}")
    return 0


_COMMANDS: dict[str, Command] = {
    "models": _cmd_models,
    "nodes": _cmd_nodes,
    "extract": _cmd_extract,
    "show-maps": _cmd_show_maps,
    "show-filters": _cmd_show_filters,
}


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
    args = _build_parser().parse_args(argv)
    target = getattr(args, "target", None) or _default_target()
    timeout = getattr(args, "timeout", None)
    options: dict[str, Any] = {}
    try:
        options = _client_options(args)
        if timeout:
            options["timeout"] = timeout
        with FeatureClient(target, **options) as client:
            return _COMMANDS[args.command](client, args)
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


if __name__ == "__main__":
    raise SystemExit(main())
