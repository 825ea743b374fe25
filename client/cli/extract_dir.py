"""The bulk run of ``layertap extract DIR`` (also ``fit-whitening``'s): resumable extraction
of every image under the inputs into one .npz, .npy or .parquet output.

Feature extraction over a photo collection runs for hours, so the output is checkpointed
atomically every few hundred images and a rerun of the same command skips every image the
file already holds. Rows are always written sorted by id, so a resumed run ends with exactly
the file an uninterrupted run would have written.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import grpc
import numpy as np

from .._bulk import progress_bar
from ..errors import FeatureServiceError
from .shards import ShardRows, is_sharded_output
from .stores import NpyStore, Table, open_store

if TYPE_CHECKING:
    from .._sync import FeatureClient

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp"})

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


# ----------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Image:
    """One image to extract: its id in the output, and where it is read from."""

    id: str
    path: Path


def _walk(root: Path, recursive: bool, skipped: list[str]) -> Iterator[Path]:
    """Image files under ``root``; hidden entries (``.DS_Store``, ``._x.jpg``) are not images.

    Linked directories are followed once (their real path is remembered) so a link cycle
    cannot loop forever; broken links are reported and skipped.
    """
    seen: set[str] = set()

    def on_error(exc: OSError) -> None:
        skipped.append(f"{exc.filename}: {exc.strerror or exc}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            if not path.is_file():
                skipped.append(f"{path}: broken link or not a regular file")
                continue
            yield path


def discover(inputs: Sequence[Path], recursive: bool) -> tuple[list[Image], list[str]]:
    """The images to extract, sorted by id, and notes about entries that were skipped.

    A directory contributes its image files (``recursive``: and its subdirectories'), with
    ids relative to it; a file argument is used whatever its extension, with the path as
    given for id. Two different files that would get the same id are refused.
    """
    found: dict[str, Path] = {}
    skipped: list[str] = []
    for given in inputs:
        if given.is_dir():
            pairs = [(p.relative_to(given).as_posix(), p) for p in _walk(given, recursive, skipped)]
        elif given.exists():
            pairs = [(given.as_posix(), given)]
        else:
            raise FileNotFoundError(f"no such file or directory: {given}")
        for image_id, path in pairs:
            if "\n" in image_id or "\r" in image_id:
                skipped.append(f"{path}: a line break in the name cannot be stored as an id")
                continue
            other = found.get(image_id)
            if other is not None and os.path.realpath(other) != os.path.realpath(path):
                raise ValueError(
                    f"{other} and {path} would both be stored as id {image_id!r}; "
                    "extract these directories into separate outputs"
                )
            found[image_id] = path
    return [Image(i, found[i]) for i in sorted(found)], skipped


# ----------------------------------------------------------------------------- the run


@dataclass
class Options:
    """What the bulk run needs from the command line."""

    inputs: list[Path]
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
    progress: bool = True
    post: list[str] = field(default_factory=list)
    concat: bool = False
    concat_key: str | None = None
    tta: dict[str, Any] | None = None
    rmac_levels: int = 0
    bypass_result_cache: bool = False  # not recorded in the file: it changes no result

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


class _Rows:
    """Rows gathered so far (from the file and this run); saved sorted by id."""

    def __init__(self, store: Any, keys: list[str], base: Table | None, meta: dict[str, Any]):
        self.store = store
        self.keys = keys
        self.meta = meta
        self.ids: list[str] = list(base.ids) if base else []
        self.chunks: dict[str, list[np.ndarray]] = {
            k: [base.arrays[k if not isinstance(store, NpyStore) else ""]] if base else []
            for k in keys
        }
        self.done = set(self.ids)
        self.pending = 0

    def add(self, image_id: str, result: Mapping[str, np.ndarray]) -> None:
        self.ids.append(image_id)
        self.done.add(image_id)
        for k in self.keys:
            self.chunks[k].append(np.asarray(result[k])[None])  # a one-row block
        self.pending += 1

    @property
    def count(self) -> int:
        return len(self.ids)

    def save(self) -> None:
        order = sorted(range(len(self.ids)), key=self.ids.__getitem__)
        self.ids = [self.ids[i] for i in order]
        arrays = {}
        for k in self.keys:
            merged = np.concatenate(self.chunks[k])[order]
            self.chunks[k] = [merged]
            arrays["" if isinstance(self.store, NpyStore) else k] = merged
        self.store.save(Table(self.ids, arrays, self.meta))
        self.pending = 0


def _check_compatible(
    base: Table, path: Path, expected: Mapping[str, np.ndarray], meta: dict[str, Any], npy: bool
) -> None:
    """Refuse to append rows of different outputs to an existing file (mixed features)."""
    have = {"": base.arrays[""]} if npy else base.arrays
    want = {"": next(iter(expected.values()))} if npy else expected
    if list(have) != list(want):
        raise ValueError(
            f"{path} holds outputs {sorted(have)}, this run makes {sorted(want)}; "
            "use a new output file for different nodes"
        )
    for key, array in want.items():
        old = have[key]
        if old.shape[1:] != array.shape[1:] or old.dtype != array.dtype:
            raise ValueError(
                f"{path}: output {key or 'vectors'!r} is {list(old.shape[1:])} {old.dtype} "
                f"there but {list(array.shape[1:])} {array.dtype} in this run; use a new "
                "output file for different options"
            )
    if base.meta and base.meta != meta:
        raise ValueError(
            f"{path} was written with {base.meta}, this run uses {meta}; "
            "use a new output file for different options"
        )


def run(client: FeatureClient, opts: Options, out: IO[str] | None = None) -> int:
    """Extract every image of ``opts.inputs`` not yet in ``opts.output``; 0, or 1 when some
    images failed (they are reported, not written, and retried by the next run)."""
    out = out or sys.stdout
    sharded = is_sharded_output(opts.output)
    store = None if sharded else open_store(opts.output)
    if isinstance(store, NpyStore) and (
        (len(opts.nodes) != 1 and not opts.concat) or opts.pool in (None, "raw")
    ):
        raise ValueError(
            ".npy output holds the vectors of one pooled output: give exactly one --node (or "
            "several with --concat) and a --pool (use .npz or .parquet for several nodes or "
            "raw feature maps)"
        )
    images, skipped = discover(opts.inputs, opts.recursive)
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)
    options: dict[str, Any] = {
        "model": opts.model,
        "nodes": list(opts.nodes),
        "pool": opts.pool,
        "gem_p": opts.gem_p,
        "normalize": opts.normalize,
        "dtype": opts.dtype,
        **opts.descriptor(),
    }
    # One synthetic image first: a wrong model, node or option fails once here instead of
    # once per image, and its outputs say what the file must hold before resuming into it.
    probe = client.extract(np.zeros((32, 32, 3), dtype=np.uint8), **options)
    keys = list(probe)
    if "ids" in keys or "id" in keys:
        raise ValueError("an output key named 'ids'/'id' would clash with the id column")
    if isinstance(store, NpyStore) and np.asarray(probe[keys[0]]).ndim != 2:
        raise ValueError(".npy output needs pooled vectors, not raw feature maps")
    meta = {k: v for k, v in options.items() if k != "gem_p" or opts.pool == "gem"}
    base = None
    rows: _Rows | ShardRows
    if store is None:
        rows = ShardRows.open(opts.output, opts.shard_format, opts.shard_rows, probe, meta)
    else:
        base = store.load()
        if base is not None:
            expected = {k: np.asarray(probe[k]) for k in keys}
            _check_compatible(base, opts.output, expected, meta, npy=isinstance(store, NpyStore))
        rows = _Rows(store, keys, base, meta)
    todo = [im for im in images if im.id not in rows.done]
    already = len(images) - len(todo)
    failures: list[str] = []
    # A bar only on a terminal (a log file would fill with redraws).
    bar = progress_bar(None if opts.progress and todo else False, len(todo), desc=None)
    lock = threading.Lock()

    def report(message: str, advance: bool = False) -> None:
        with lock:  # extract_many may read the items on another thread
            failures.append(message)
            if bar is not None:
                bar.write(message, file=sys.stderr)
                if advance:
                    bar.update(1)
            else:
                print(message, file=sys.stderr)

    def items() -> Iterator[tuple[str, bytes]]:
        """Files are read lazily, one at a time, so memory stays flat on any collection;
        an unreadable file is reported here and never sent."""
        for im in todo:
            try:
                data = im.path.read_bytes()
            except OSError as exc:
                report(f"{im.path}: unreadable: {exc.strerror or exc}", advance=True)
                continue
            if not data:
                report(f"{im.path}: empty file", advance=True)
                continue
            yield im.id, data

    paths = {im.id: im.path for im in todo}
    added = 0
    try:
        stream = client.extract_many(
            items(),
            **options,
            bypass_result_cache=opts.bypass_result_cache,
            batch_size=opts.batch_size,
            concurrency=opts.concurrency,
            ordered=True,
            errors="yield",
            progress=False,  # this run draws its own bar: it knows the total
        )
        for image_id, result in stream:
            if isinstance(result, FeatureServiceError):
                if result.code in _FATAL_CODES:
                    raise result
                report(f"{paths.get(image_id, image_id)}: {result.code_name}: {result.details}")
            else:
                rows.add(image_id, {k: np.asarray(result[k])[0] for k in keys})
                added += 1
                if rows.pending >= opts.checkpoint_every:
                    rows.save()
            if bar is not None:
                with lock:
                    bar.update(1)
    except BaseException:
        # Interrupted (Ctrl-C) or the server went away: keep what was computed.
        if rows.pending:
            rows.save()
        if bar is not None:
            bar.close()
        print(
            f"stopped after {added} new image(s); {rows.count} saved in {opts.output}. "
            "Run the same command again to resume.",
            file=sys.stderr,
        )
        raise
    if bar is not None:
        bar.close()
    if rows.pending or base is None:
        rows.save()
    print(
        f"{added} new image(s) extracted, {already} already in {opts.output}, "
        f"{len(failures)} failed; {rows.count} row(s) in {opts.output}",
        file=out,
    )
    if failures:
        print(f"{len(failures)} image(s) failed (not written; rerun to retry them):", file=out)
        for message in failures:
            print(f"  {message}", file=out)
        return 1
    return 0


def options_from_args(args: argparse.Namespace, output: Path, **fields: Any) -> Options:
    """The bulk run's :class:`Options` for a subcommand that took ``add_input_arguments``,
    ``add_bulk_arguments`` (:mod:`.common`), --pool, --gem-p and --no-progress, writing
    ``output``; ``fields``: any further Options fields."""
    return Options(
        inputs=[Path(p) for p in args.images],
        output=output,
        model=args.model,
        nodes=list(args.nodes),
        pool=args.pool,
        gem_p=args.gem_p,
        recursive=args.recursive,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        progress=not args.no_progress,
        **fields,
    )
