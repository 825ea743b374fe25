"""``layertap extract DIR``: resumable bulk extraction into .npz, .npy or .parquet.

Feature extraction over a photo collection runs for hours, so the output is checkpointed
atomically every few hundred images and a rerun of the same command skips every image the
file already holds. Rows are always written sorted by id, so a resumed run ends with exactly
the file an uninterrupted run would have written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import grpc
import numpy as np

from ._cli_args import positive_int
from ._option_parsing import parse_post_step
from ._options import POST_FORMS
from .errors import FeatureServiceError

if TYPE_CHECKING:
    from ._sync import FeatureClient

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp"})
FORMATS = (".npz", ".npy", ".parquet")
PARQUET_INSTALL_HINT = "pip install 'layertap[parquet]'"

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


# ----------------------------------------------------------------------------- stores


@dataclass
class Table:
    """Rows of an output file: ids and, per output key, an array [rows, ...]."""

    ids: list[str]
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename over ``path``:
    a crash at any moment leaves either the old file or the new one, never half of one.
    Missing parent directories are created (``-o out/features.npz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_npz(f: IO[bytes] | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """What ``np.savez(f, **arrays)`` writes, without keys clashing with its parameters."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _ids_array(ids: Sequence[str]) -> np.ndarray:
    return np.asarray(list(ids), dtype=np.str_) if ids else np.zeros(0, dtype="<U1")


class _NpzStore:
    """``ids`` plus one array per output key, in one .npz."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Table | None:
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as npz:
            if "ids" not in npz.files:
                raise ValueError(
                    f"{self.path} exists but has no 'ids' array (not written by a bulk "
                    "`layertap extract`); choose another output or delete it"
                )
            ids = [str(i) for i in npz["ids"]]
            arrays = {k: npz[k] for k in npz.files if k != "ids"}
        return Table(ids, arrays)

    def save(self, table: Table) -> None:
        _atomic_write(
            self.path, lambda f: write_npz(f, {"ids": _ids_array(table.ids), **table.arrays})
        )


class _NpyStore:
    """One pooled output as a 2-D .npy, ids one per line in ``<name>.ids.txt``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids_path = path.with_suffix(".ids.txt")

    def load(self) -> Table | None:
        if not self.path.exists():
            return None
        if not self.ids_path.exists():
            raise ValueError(
                f"{self.path} exists without its ids file {self.ids_path}; "
                "choose another output or delete it"
            )
        array = np.load(self.path, allow_pickle=False)
        ids = self.ids_path.read_text(encoding="utf-8").splitlines()
        if len(ids) != len(array):
            raise ValueError(
                f"{self.ids_path} has {len(ids)} ids but {self.path} {len(array)} rows "
                "(written by something else, or interrupted between the two renames); "
                "delete both to start over"
            )
        return Table(ids, {"": array})

    def save(self, table: Table) -> None:
        (array,) = table.arrays.values()
        _atomic_write(self.path, lambda f: np.save(f, array, allow_pickle=False))
        text = "".join(i + "\n" for i in table.ids)
        _atomic_write(self.ids_path, lambda f: f.write(text.encode("utf-8")))


class _ParquetStore:
    """Column ``id`` plus one ``list<float>`` column per output key; shapes and the
    extraction options in the schema metadata (checked on resume)."""

    def __init__(self, path: Path) -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                f".parquet output needs pyarrow: {PARQUET_INSTALL_HINT} ({exc})"
            ) from None
        self.path = path

    def load(self) -> Table | None:
        import pyarrow.parquet as pq

        if not self.path.exists():
            return None
        table = pq.read_table(self.path)
        raw = (table.schema.metadata or {}).get(b"layertap")
        if raw is None or "id" not in table.column_names:
            raise ValueError(
                f"{self.path} was not written by a bulk `layertap extract`; "
                "choose another output or delete it"
            )
        meta = json.loads(raw)
        n = table.num_rows
        # list<float> holds float16 outputs exactly (int8 ones are list<int8>); give them back
        # in the run's dtype
        dtype = _PARQUET_DTYPES.get(meta["options"].get("dtype"), np.float32)
        arrays = {}
        for key in table.column_names:
            if key == "id":
                continue
            shape = meta["shapes"][key]
            flat = table.column(key).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            arrays[key] = np.asarray(flat, dtype=dtype).reshape(n, *shape)
        return Table([str(i) for i in table.column("id").to_pylist()], arrays, meta["options"])

    def save(self, table: Table) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns: dict[str, Any] = {"id": pa.array(table.ids, type=pa.string())}
        shapes = {}
        for key, array in table.arrays.items():
            n = len(array)
            dtype = np.int8 if array.dtype == np.int8 else np.float32
            flat = np.ascontiguousarray(array, dtype=dtype).reshape(n, -1)
            width = flat.shape[1]
            offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width, type=pa.int32())
            columns[key] = pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1)))
            shapes[key] = list(array.shape[1:])
        meta = json.dumps({"shapes": shapes, "options": table.meta})
        out = pa.table(columns).replace_schema_metadata({"layertap": meta})
        _atomic_write(self.path, lambda f: pq.write_table(out, f))


_PARQUET_DTYPES: dict[str, type[np.generic]] = {"float16": np.float16, "int8": np.int8}


def _store(path: Path) -> _NpzStore | _NpyStore | _ParquetStore:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _NpzStore(path)
    if suffix == ".npy":
        return _NpyStore(path)
    if suffix == ".parquet":
        return _ParquetStore(path)
    raise ValueError(f"unknown output format {path.suffix!r}; use one of {', '.join(FORMATS)}")


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
    progress: bool = True
    post: list[str] = field(default_factory=list)
    concat: bool = False
    concat_key: str | None = None
    tta: dict[str, Any] | None = None
    rmac_levels: int = 0

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
            k: [base.arrays[k if not isinstance(store, _NpyStore) else ""]] if base else []
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

    def save(self) -> None:
        order = sorted(range(len(self.ids)), key=self.ids.__getitem__)
        self.ids = [self.ids[i] for i in order]
        arrays = {}
        for k in self.keys:
            merged = np.concatenate(self.chunks[k])[order]
            self.chunks[k] = [merged]
            arrays["" if isinstance(self.store, _NpyStore) else k] = merged
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


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr when it is a terminal (a log file would fill with redraws)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; the run works without it
        return None
    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)


def run(client: FeatureClient, opts: Options, out: IO[str] | None = None) -> int:
    """Extract every image of ``opts.inputs`` not yet in ``opts.output``; 0, or 1 when some
    images failed (they are reported, not written, and retried by the next run)."""
    out = out or sys.stdout
    store = _store(opts.output)
    if isinstance(store, _NpyStore) and (
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
    if isinstance(store, _NpyStore) and np.asarray(probe[keys[0]]).ndim != 2:
        raise ValueError(".npy output needs pooled vectors, not raw feature maps")
    meta = {k: v for k, v in options.items() if k != "gem_p" or opts.pool == "gem"}
    base = store.load()
    if base is not None:
        expected = {k: np.asarray(probe[k]) for k in keys}
        _check_compatible(base, opts.output, expected, meta, npy=isinstance(store, _NpyStore))
    rows = _Rows(store, keys, base, meta)
    todo = [im for im in images if im.id not in rows.done]
    already = len(images) - len(todo)
    failures: list[str] = []
    bar = _progress_bar(len(todo), opts.progress and bool(todo))
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
            f"stopped after {added} new image(s); {len(rows.ids)} saved in {opts.output}. "
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
        f"{len(failures)} failed; {len(rows.ids)} row(s) in {opts.output}",
        file=out,
    )
    if failures:
        print(f"{len(failures)} image(s) failed (not written; rerun to retry them):", file=out)
        for message in failures:
            print(f"  {message}", file=out)
        return 1
    return 0


# ----------------------------------------------------------------------------- arguments


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


def options_from_args(args: argparse.Namespace, output: Path, **fields: Any) -> Options:
    """The bulk run's :class:`Options` for a subcommand that took ``add_input_arguments``,
    ``add_bulk_arguments`` (:mod:`._cli_args`), --pool, --gem-p and --no-progress, writing
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
