"""``layertap extract``: activations of image files, printed as a summary after one request
(optionally saved as .npz), or, given directories or a bulk output, the resumable bulk run
(:mod:`.extract_dir`); also the descriptor flags (--post, --concat, --tta-*, --rmac-levels).
"""

from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from layertap.common.option_parsing import parse_post_step
from layertap.common.options import OUTPUT_DTYPES, POOLING, POST_FORMS

from . import extract_dir
from .common import (
    Subcommands,
    add_bulk_arguments,
    add_input_arguments,
    format_table,
    positive_float,
    positive_int,
)
from .remote import scheme
from .sources import PARQUET_LISTS, TEXT_LISTS
from .stores import write_npz

if TYPE_CHECKING:
    from .._sync import FeatureClient


def register(subcommands: Subcommands) -> None:
    """Add the ``extract`` subcommand (one call from client/cli/__init__.py)."""
    ext = subcommands.add(
        "extract",
        command,
        help="extract activations of image files, or of whole directories, lists or URLs "
        "(resumable)",
        description="Extract activations. Given only image files (and no output or an .npz), "
        "one request is made and a summary printed. Given a directory, a list (.txt, .parquet, "
        "--list), a URL, --recursive, or a .npy/.parquet/directory output, every image is "
        "extracted into the output with its id (path relative to the directory, or the list's "
        "entry or id column); a rerun skips images already there. Inputs stream: memory stays "
        "flat on millions of images with a directory output.",
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
    add_descriptor_arguments(ext)
    ext.add_argument(
        "--bypass-result-cache",
        action="store_true",
        help="compute every image afresh on a server with a result cache (result_cache_bytes): "
        "it is neither read nor stored into",
    )
    ext.add_argument(
        "-o",
        "--output",
        type=Path,
        help="output file: .npz (ids + one array per node), .npy (one pooled node; ids in "
        "NAME.ids.txt) or .parquet (id + one list column per node; needs layertap[parquet]); "
        "or, for a collection, a directory (no suffix): append-only shards (--shard-format)",
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
    ext.add_argument(
        "--shard-format",
        choices=("parquet", "npy"),
        default="parquet",
        help="a directory output's shards: parquet (id + one fixed-size list column per node, "
        "needs layertap[parquet]) or npy (one .npy per node + ids)",
    )
    ext.add_argument(
        "--shard-rows",
        type=int,
        default=0,
        metavar="N",
        help="rows per shard of a directory output (default 0: about 64 MiB of rows each)",
    )
    ext.add_argument(
        "--row-group-rows",
        type=int,
        default=0,
        metavar="N",
        help="rows per row group of Parquet shards (default 0: about 32 MiB of rows each)",
    )
    ext.add_argument("--no-progress", action="store_true", help="no progress bar")


def _post_step(text: str) -> str:
    """argparse type of --post: checked here so a typo fails before anything is sent."""
    try:
        parse_post_step(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _scales(text: str) -> list[float]:
    """argparse type of --tta-scales: "1,0.7071,0.5"."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a list of numbers like 1,0.707,0.5: {text!r}"
        ) from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive numbers: {text!r}")
    return values


def add_descriptor_arguments(parser: argparse.ArgumentParser) -> None:
    """The descriptor options of ``layertap extract`` (see FeatureClient.extract)."""
    parser.add_argument(
        "--post",
        action="append",
        type=_post_step,
        metavar="STEP",
        help=f"post-processing step after pooling, repeat for a chain applied in order: "
        f"{POST_FORMS.split(', or a dict')[0]} (HEAD: a head the server has)",
    )
    parser.add_argument(
        "--concat",
        action="store_true",
        help="one descriptor of all --node outputs: each pooled and L2-normalised, "
        "concatenated in order, L2-normalised",
    )
    parser.add_argument(
        "--concat-key", metavar="KEY", help="output key of --concat (default: descriptor)"
    )
    parser.add_argument(
        "--tta-flip", action="store_true", help="average with the horizontally flipped image"
    )
    parser.add_argument(
        "--tta-scales",
        type=_scales,
        metavar="S1,S2,...",
        help="average over these input scales, e.g. 1,0.707,0.5",
    )
    parser.add_argument(
        "--rmac-levels",
        type=positive_int,
        default=0,
        metavar="L",
        help="R-MAC / R-GeM region levels (--pool rmac/rgem; default: 3)",
    )


def descriptor_options(args: argparse.Namespace) -> dict[str, Any]:
    """``extract`` keywords (also :class:`Options` fields) for the options given."""
    tta: dict[str, Any] = {}
    if args.tta_flip:
        tta["flip"] = True
    if args.tta_scales:
        tta["scales"] = list(args.tta_scales)
    given = {
        "post": list(args.post or []),
        "concat": bool(args.concat),
        "concat_key": args.concat_key,
        "tta": tta or None,
        "rmac_levels": int(args.rmac_levels or 0),
    }
    return {k: v for k, v in given.items() if v}


def summary_rows(result: Any) -> list[list[str]]:
    """KEY, SHAPE, DTYPE, NODE rows of a one-request result (a list output: per image)."""
    rows = []
    for key in result:
        arrays = result.arrays(key) if result.is_ragged(key) else [result[key]]
        shape = " ".join(str(list(a.shape)) for a in arrays)
        node = result.nodes.get(key, "")
        rows.append([key, shape, str(arrays[0].dtype), node])
    return rows


def _bulk_mode(args: argparse.Namespace) -> bool:
    """Directories, lists, URLs, --recursive, a .npy/.parquet output or an output a bulk run
    wrote mean the resumable bulk mode; plain files with an .npz (or no) output keep the
    one-request mode."""
    if args.recursive or args.lists:
        return True
    for given in args.images:
        if scheme(given) is not None or Path(given).is_dir():
            return True
        if Path(given).suffix.lower() in TEXT_LISTS | PARQUET_LISTS:
            return True
    out: Path | None = args.output
    if out is None:
        return False
    if out.is_dir() or out.suffix.lower() in (".npy", ".parquet"):
        return True
    if out.suffix.lower() == ".npz" and out.is_file():
        try:
            with np.load(out, allow_pickle=False) as npz:
                return "ids" in npz.files
        except (OSError, ValueError, zipfile.BadZipFile):
            return False  # not an .npz at all: the one-request mode overwrites it, as before
    return False


def command(client: FeatureClient, args: argparse.Namespace) -> int:
    if not args.images and not args.lists:
        raise ValueError("nothing to extract: give image files, directories, lists or URLs")
    if _bulk_mode(args):
        if args.output is None:
            raise ValueError(
                "extracting a directory, list or URL needs -o/--output (.npz, .npy, .parquet, "
                "or a directory for shards)"
            )
        # pyarrow's default allocator (mimalloc) keeps the pages it frees: over a run of a
        # million images that is ~40 MB more RSS than a short run. The system allocator gives
        # them back. Set before pyarrow is first imported (lazily, by the run); a value the
        # user set is kept.
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
        opts = extract_dir.options_from_args(
            args,
            args.output,
            normalize=args.normalize,
            dtype=args.dtype,
            checkpoint_every=args.checkpoint_every,
            shard_format=args.shard_format,
            shard_rows=args.shard_rows,
            row_group_rows=args.row_group_rows,
            bypass_result_cache=args.bypass_result_cache,
            **descriptor_options(args),
        )
        try:
            return extract_dir.run(client, opts)
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
        bypass_result_cache=args.bypass_result_cache,
        **descriptor_options(args),
    )
    rows = summary_rows(result)
    print(format_table(["KEY", "SHAPE", "DTYPE", "NODE"], rows))
    meta = result.metadata
    print(
        f"model {meta.model} on {meta.device or '?'}: {len(result.per_image)} image(s), "
        f"{meta.timings.total_ms:.1f} ms server time"
    )
    if args.output is not None:
        path: Path = args.output
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")  # what np.savez would do; report it
        write_npz(path, {key: result.array(key) for key in result})
        print(f"wrote {path}")
    return 0
