"""The bulk run of ``layertap extract DIR|LIST|URL ...`` (also ``fit-whitening``'s): resumable
extraction of every image of the inputs into one .npz, .npy or .parquet output, or a
directory of append-only shards.

Feature extraction over a photo collection runs for hours, so the output is checkpointed
(a file: atomically every few hundred images; a directory: one finished shard at a time) and
a rerun of the same command skips every image the output already holds. A file's rows are
always written sorted by id, so a resumed run ends with exactly the file an uninterrupted run
would have written.

Memory stays flat on any collection with a directory output: the inputs are discovered as a
stream (:mod:`.sources`), read a few at a time ahead of the requests (:mod:`.prefetch`), and
the ids already done or met are kept as 8-12 byte hashes (:mod:`.idsets`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import grpc
import numpy as np

from ..errors import FeatureServiceError
from .idsets import SeenIds
from .outputs import open_rows
from .prefetch import prefetch
from .progress import Progress, Summary
from .shards import is_sharded_output
from .sources import (
    IMAGE_EXTENSIONS,
    Image,
    as_input,
    discover,
    iter_images,
    open_sources,
    select,
)
from .stores import NpyStore, open_store

if TYPE_CHECKING:
    from .._sync import FeatureClient

__all__ = ["IMAGE_EXTENSIONS", "Image", "Options", "discover", "options_from_args", "run"]

# Failures that concern the whole run, not one image: continuing would only repeat them.
_FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass
class Options:
    """What the bulk run needs from the command line."""

    inputs: Sequence[Path | str]  # paths, lists (.txt, .parquet) and URLs (sources.py)
    output: Path
    model: str
    nodes: list[str]
    pool: str | None
    gem_p: float = 3.0
    normalize: bool = False
    dtype: str = "float32"
    recursive: bool = False
    batch_size: int = 8
    concurrency: int = 4
    checkpoint_every: int = 500
    shard_format: str = "parquet"  # a directory output's shards (shards.py)
    shard_rows: int = 0
    row_group_rows: int = 0  # Parquet shards' row groups (0: about 32 MiB of rows)
    progress: bool = True
    post: list[str] = field(default_factory=list)
    concat: bool = False
    concat_key: str | None = None
    tta: dict[str, Any] | None = None
    rmac_levels: int = 0
    bypass_result_cache: bool = False  # not recorded in the file: it changes no result
    lists: Sequence[Path | str] = ()  # --list files (text or Parquet, whatever their name)
    read_threads: int = 8  # images read at once (object stores are slow: overlap them)
    read_ahead: int = 32  # images read and not yet sent, at most
    summary_json: Path | None = None

    def descriptor(self) -> dict[str, Any]:
        """The descriptor options that differ from the defaults, as ``extract`` keywords.
        Only those go into the file's recorded options, so a plain run resumes into a file
        written before these options existed."""
        given = {
            "post": list(self.post),
            "concat": self.concat,
            "concat_key": self.concat_key,
            "tta": self.tta,
            "rmac_levels": self.rmac_levels,
        }
        return {k: v for k, v in given.items() if v}


def _probe(client: FeatureClient, options: dict[str, Any], npy: bool) -> Any:
    """One synthetic image first: a wrong model, node or option fails once here instead of
    once per image, and its outputs say what the output must hold before resuming into it."""
    probe = client.extract(np.zeros((32, 32, 3), dtype=np.uint8), **options)
    keys = list(probe)
    if "ids" in keys or "id" in keys:
        raise ValueError("an output key named 'ids'/'id' would clash with the id column")
    if npy and np.asarray(probe[keys[0]]).ndim != 2:
        raise ValueError(".npy output needs pooled vectors, not raw feature maps")
    return probe


def run(client: FeatureClient, opts: Options, out: IO[str] | None = None) -> int:
    """Extract every image of ``opts.inputs`` not yet in ``opts.output``; 0, or 1 when some
    images failed (they are reported, not written, and retried by the next run)."""
    out = out or sys.stdout
    summary = Summary(str(opts.output))  # the clock starts here
    sources = open_sources(opts.inputs, opts.lists)  # a missing input fails before any work
    if not sources:
        raise ValueError("nothing to extract: give images, directories, lists or URLs")
    store = None if is_sharded_output(opts.output) else open_store(opts.output)
    npy = isinstance(store, NpyStore)
    if npy and ((len(opts.nodes) != 1 and not opts.concat) or opts.pool in (None, "raw")):
        raise ValueError(
            ".npy output holds the vectors of one pooled output: give exactly one --node (or "
            "several with --concat) and a --pool (use .npz or .parquet for several nodes or "
            "raw feature maps)"
        )
    options: dict[str, Any] = {
        "model": opts.model,
        "nodes": list(opts.nodes),
        "pool": opts.pool,
        "gem_p": opts.gem_p,
        "normalize": opts.normalize,
        "dtype": opts.dtype,
        **opts.descriptor(),
    }
    probe = _probe(client, options, npy)
    keys = list(probe)
    meta = {k: v for k, v in options.items() if k != "gem_p" or opts.pool == "gem"}
    rows, done = open_rows(
        opts.output, store, probe, meta, opts.shard_format, opts.shard_rows, opts.row_group_rows
    )
    progress = Progress(opts.progress)

    def skipped(note: str) -> None:
        summary.skip(note)
        progress.message(f"skipped {note}")

    def fail(image_id: str, where: str, reason: str) -> None:
        summary.fail(image_id, where, reason)
        progress.message(f"{where}: {reason}")
        progress.advance(failed=True)

    # One directory (or glob) gives distinct ids; lists and several inputs are checked.
    seen = None if len(sources) == 1 and sources[0].unique_ids else SeenIds()

    def already() -> None:
        summary.already += 1

    todo = select(iter_images(sources, opts.recursive, skipped), seen, skipped, done, already)
    progress.count_in_background(lambda: iter_images(sources, opts.recursive, _quiet), done)
    in_flight: dict[str, Image] = {}  # sent and not answered: bounded by extract_many's window

    def items() -> Iterator[tuple[str, bytes]]:
        """Images read ahead in order by a few threads; an unreadable or empty file is
        reported here and never sent."""
        reads = prefetch(todo, Image.read, threads=opts.read_threads, ahead=opts.read_ahead)
        for image, data in reads:
            if isinstance(data, Exception):
                reason = getattr(data, "strerror", None) or str(data) or type(data).__name__
                fail(image.id, image.where, f"unreadable: {reason}")
            elif not data:
                fail(image.id, image.where, "empty file")
            else:
                in_flight[image.id] = image
                yield image.id, data

    feed = items()
    stream: Any = None
    try:
        stream = client.extract_many(
            feed,
            **options,
            bypass_result_cache=opts.bypass_result_cache,
            batch_size=opts.batch_size,
            concurrency=opts.concurrency,
            ordered=True,
            errors="yield",
            progress=False,  # this run draws its own bar
        )
        for image_id, result in stream:
            sent = in_flight.pop(image_id, None)
            if isinstance(result, FeatureServiceError):
                if result.code in _FATAL_CODES:
                    raise result
                where = sent.where if sent is not None else str(image_id)
                fail(image_id, where, f"{result.code_name}: {result.details}")
                continue
            rows.add(image_id, {k: np.asarray(result[k])[0] for k in keys})
            summary.added += 1
            progress.advance()
            if rows.pending >= opts.checkpoint_every:
                rows.save()
    except BaseException as exc:
        # Interrupted (Ctrl-C) or the server went away: keep what was computed.
        for generator in (stream, feed):  # stop the requests and the reads ahead
            with contextlib.suppress(Exception):
                getattr(generator, "close", lambda: None)()
        if rows.pending:
            rows.save()
        progress.close(complete=False)
        summary.error = f"{type(exc).__name__}: {exc}"
        summary.stop(rows.count)
        if opts.summary_json is not None:
            summary.write_json(opts.summary_json)
        print(
            f"stopped after {summary.added} new image(s); {rows.count} saved in {opts.output}. "
            "Run the same command again to resume.",
            file=sys.stderr,
        )
        raise
    progress.close(complete=True)
    if rows.pending or rows.fresh:
        rows.save()
    summary.finished = True
    summary.stop(rows.count)
    if opts.summary_json is not None:
        summary.write_json(opts.summary_json)
    summary.print(out)
    return 1 if summary.failed else 0


def _quiet(note: str) -> None:
    """The background count's skip notes: the run itself reports them."""


def options_from_args(args: argparse.Namespace, output: Path, **fields: Any) -> Options:
    """The bulk run's :class:`Options` for a subcommand that took ``add_input_arguments``,
    ``add_bulk_arguments`` (:mod:`.common`), --pool, --gem-p and --no-progress, writing
    ``output``; ``fields``: any further Options fields."""
    return Options(
        inputs=[as_input(p) for p in args.images],
        lists=[as_input(p) for p in getattr(args, "lists", None) or []],
        output=output,
        model=args.model,
        nodes=list(args.nodes),
        pool=args.pool,
        gem_p=args.gem_p,
        recursive=args.recursive,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        read_threads=getattr(args, "read_threads", 8),
        read_ahead=getattr(args, "read_ahead", 32),
        summary_json=getattr(args, "summary_json", None),
        progress=not args.no_progress,
        **fields,
    )
