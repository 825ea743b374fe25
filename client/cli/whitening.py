"""``layertap fit-whitening``: fit a PCA-whitening head over descriptors of a folder of images.

The descriptors are extracted through the server with the bulk ``layertap extract DIR`` run
(same file discovery, progress, failure reporting and resumable .npz), L2-normalised (each
node's part, then their concatenation with ``--concat``: what the server's ``concat`` does),
and fitted with numpy (``_whitening.fit``). The head file is what the server's ``[[heads]]``
config entry loads; clients then name it in ``post`` (``whiten:NAME``), never upload it.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from layertap.common.options import POOLING

from .. import _whitening
from . import extract_dir
from .common import Subcommands, add_bulk_arguments, add_input_arguments, positive_float
from .stores import atomic_write

if TYPE_CHECKING:
    from .._sync import FeatureClient


def register(subcommands: Subcommands) -> None:
    """Add the ``fit-whitening`` subcommand (one call from client/cli/__init__.py)."""
    p = subcommands.add(
        "fit-whitening",
        command,
        help="fit a PCA-whitening head (.npz) over descriptors of a folder of images",
        description="Extract a pooled descriptor of every image (like `layertap extract DIR`), "
        "L2-normalise them and fit their mean, principal axes and variances. Register the "
        "written .npz in the server config as a [[heads]] entry; requests then ask for "
        "post=['l2', 'whiten:NAME'] (or 'pca:NAME:DIM').",
    )
    add_input_arguments(
        p, node_help="node to pool (repeat with --concat for a multi-node descriptor)"
    )
    p.add_argument(
        "--concat",
        action="store_true",
        help="fit on the concatenation of the nodes' L2-normalised descriptors (the server's "
        "concat=True)",
    )
    pools = [name for name in POOLING if name != "raw"]
    p.add_argument("--pool", choices=pools, default="gem", help="default: gem")
    p.add_argument("--gem-p", type=positive_float, default=3.0)
    p.add_argument(
        "--dim",
        type=int,
        default=0,
        metavar="K",
        help="components to keep (default: all with non-zero variance, at most "
        "min(images - 1, descriptor size)); requests may truncate further",
    )
    p.add_argument(
        "--shrinkage",
        type=float,
        default=0.0,
        metavar="A",
        help="regularise the variances: (1-A) l_i + A * mean variance (0..1; default 0). "
        "Worth 0.1-0.5 when fitting on a few hundred images or fewer",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="head file to write (.npz)")
    p.add_argument(
        "--name", help="head name in the printed config snippet (default: the file's stem)"
    )
    p.add_argument(
        "--descriptors",
        type=Path,
        metavar="NPZ",
        help="keep the extracted descriptors in this .npz (a rerun resumes from it and "
        "refits without extracting again); default: a temporary file",
    )
    add_bulk_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace) -> None:
    if args.output.suffix.lower() != ".npz":
        raise ValueError(f"the head file must be an .npz, got {args.output}")
    if args.descriptors is not None and args.descriptors.suffix.lower() != ".npz":
        raise ValueError(f"--descriptors must be an .npz file, got {args.descriptors}")
    if len(args.nodes) > 1 and not args.concat:
        raise ValueError(
            "a head whitens one descriptor: give one --node, or several with --concat "
            "(fitted on their concatenation)"
        )
    if len(set(args.nodes)) != len(args.nodes):
        raise ValueError("the same --node is given twice")
    if args.dim < 0:
        raise ValueError(f"--dim must be 0 (all) or positive, got {args.dim}")
    if not 0.0 <= args.shrinkage <= 1.0:
        raise ValueError(f"--shrinkage must be in [0, 1], got {args.shrinkage}")


def descriptors(
    client: FeatureClient, args: argparse.Namespace, path: Path, out: IO[str]
) -> tuple[list[str], np.ndarray, int]:
    """Extract (or resume) the pooled descriptors into ``path``; return ids, the
    L2-normalised (concatenated) descriptors [n, D] and the bulk run's exit code."""
    opts = extract_dir.options_from_args(args, path)
    # A temporary file's summary would only name a path that is about to go: keep the
    # summary for failures (which it lists) and for a --descriptors file the user keeps.
    summary = io.StringIO()
    code = extract_dir.run(client, opts, out=summary if args.descriptors is None else out)
    if code and args.descriptors is None:
        out.write(summary.getvalue())
    with np.load(path, allow_pickle=False) as npz:
        ids = [str(i) for i in npz["ids"]]
        parts = [np.asarray(npz[node], dtype=np.float32) for node in args.nodes]
    for node, part in zip(args.nodes, parts, strict=True):
        if part.ndim != 2:
            raise ValueError(
                f"node {node!r} with pool {args.pool!r} gives {list(part.shape[1:])} per image, "
                "not a vector: choose a pooling that makes one"
            )
    x = _whitening.concat_parts(parts) if args.concat else _whitening.l2_normalize(parts[0])
    return ids, x, code


def _snippet(args: argparse.Namespace, head: _whitening.Whitening) -> str:
    name = args.name or args.output.stem
    nodes = ", ".join(repr(n) for n in args.nodes)
    extra = ", concat=True" if args.concat else ""
    post = "['whiten:" if args.concat else "['l2', 'whiten:"
    gem = f", gem_p={args.gem_p:g}" if args.pool in ("gem", "rgem") and args.gem_p != 3.0 else ""
    return (
        "Register it in the server config (a relative file is read from the config file's "
        "directory) and restart the server:\n\n"
        "[[heads]]\n"
        f'name = "{name}"\n'
        f'file = "{args.output.resolve()}"\n'
        f'model = "{args.model}"\n\n'
        "Then ask for it by name, on the same descriptor it was fitted on"
        + ("" if args.concat else " (L2-normalised first, as here)")
        + ":\n"
        f"  client.extract(images, model={args.model!r}, nodes=[{nodes}], "
        f"pool={args.pool!r}{gem}{extra}, post={post}{name}'])\n"
        f"  ('pca:{name}:K' projects without whitening; 'whiten:{name}:K' keeps the first K "
        f"of the {head.n_components} components)"
    )


def command(client: FeatureClient, args: argparse.Namespace) -> int:
    """Extract, fit, write the head; 1 when some images failed (fitted on the others)."""
    _check(args)
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="layertap-whitening-") as tmp:
        path = args.descriptors or Path(tmp) / "descriptors.npz"
        try:
            ids, x, code = descriptors(client, args, path, out)
        except KeyboardInterrupt:
            return 130
    head = _whitening.fit(
        x,
        dim=args.dim,
        shrinkage=args.shrinkage,
        model=args.model,
        nodes=args.nodes,
        pool=args.pool,
    )
    atomic_write(args.output, lambda f: _whitening.save(head, f))
    what = f"{args.model} {'+'.join(args.nodes)}, {args.pool}"
    print(
        f"wrote {args.output}: {head.n_components} components of {head.input_dim}-d "
        f"descriptors ({what}), fitted on {len(ids)} images, "
        f"{100.0 * head.variance_kept:.1f} % of their variance"
        + (f", shrinkage {args.shrinkage:g}" if args.shrinkage else ""),
        file=out,
    )
    if len(ids) < 10 * head.n_components:
        print(
            f"note: {len(ids)} images for {head.n_components} components is little data; the "
            "weakest axes are noisy. Fit on more images, lower --dim, or use --shrinkage.",
            file=out,
        )
    print(_snippet(args, head), file=out)
    if code:
        print("some images failed (listed above): the head was fitted on the others", file=out)
    return code
