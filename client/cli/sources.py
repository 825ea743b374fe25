"""What a bulk ``layertap extract`` reads: the images of directories, single files, lists
(text or Parquet) and URLs (:mod:`.remote`), as one lazy stream of :class:`Image` (an id and
where to read it), so discovery holds one directory listing at a time, never the collection.

Inputs are taken in the order given (positional arguments, then ``--list`` files); within
each one, the order is:

- a directory: the ids (paths relative to it, with ``/``) in sorted order (by code point).
  The walk lists one directory at a time, sorting its files and subdirectories together as
  ``name`` and ``name/``, which visits the ids in exactly that order without holding them
  all: memory grows with the largest single directory, not with the collection;
- a URL directory (an object store's prefix): the same order, one ``ls`` per directory;
- a URL glob: its matches, sorted;
- a list: its lines or rows as they stand.

A list is a text file (one path or URL per line; blank lines and ``#`` comments skipped), or a
Parquet file with a ``path`` (or ``uri``) column and an optional ``id`` column; without one,
an item's id is its entry as written. Relative entries are relative to the list's own
location. Several ids may name the same file.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import remote
from .idsets import CLASH, DUPLICATE, DoneIds, SeenIds, chunks, id_hashes, source_hash
from .stores import PARQUET_INSTALL_HINT
from .walk import sorted_walk

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp"})
TEXT_LISTS = frozenset({".txt"})
PARQUET_LISTS = frozenset({".parquet", ".pq"})
PATH_COLUMNS = ("path", "uri")
LIST_BATCH_ROWS = 4096

Skipped = Callable[[str], None]


@dataclass(frozen=True)
class Image:
    """One image to extract: its id in the output, and where it is read from (a local path,
    or a path on the fsspec filesystem ``fs``)."""

    id: str
    path: Path | str
    fs: Any = field(default=None, compare=False, repr=False)

    @property
    def where(self) -> str:
        """The path or URL, for messages."""
        return str(self.path) if self.fs is None else str(self.fs.unstrip_protocol(self.path))

    @property
    def source(self) -> str:
        """Where the bytes come from, spelled one way (for telling files apart)."""
        return os.path.abspath(self.path) if self.fs is None else self.where

    def read(self) -> bytes:
        if self.fs is None:
            return Path(self.path).read_bytes()
        return bytes(self.fs.cat_file(self.path))


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: Path, recursive: bool, skipped: Skipped) -> Iterator[tuple[str, Path]]:
    """Image files under ``root``; hidden entries (``.DS_Store``, ``._x.jpg``) are not images.

    Linked directories are followed once (their real path is remembered) so a link cycle
    cannot loop forever; broken links are reported and skipped."""
    seen: set[str] = set()

    def listing(directory: Path) -> list[str]:
        real = os.path.realpath(directory)
        if real in seen:
            return []
        seen.add(real)
        names = []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    if is_dir:
                        if recursive:
                            names.append(entry.name + "/")
                    elif is_image_name(entry.name):
                        names.append(entry.name)
        except OSError as exc:
            skipped(f"{exc.filename or directory}: {exc.strerror or exc}")
        names.sort()
        return names

    for rel, path in sorted_walk(root, listing, lambda d, n: d / n):
        if not path.is_file():
            skipped(f"{path}: broken link or not a regular file")
            continue
        yield rel, path


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Source:
    """One input: ``kind`` is dir, file, text-list, parquet-list, url-dir, url-glob or
    url-file; ``where`` a local Path or a path on ``fs``; ``name`` the argument as given."""

    kind: str
    where: Path | str
    name: str
    fs: Any = field(default=None, compare=False, repr=False)

    @property
    def unique_ids(self) -> bool:
        """Whether the ids it gives are distinct by construction (lists may repeat ids)."""
        return not self.kind.endswith("-list")

    def images(self, recursive: bool, skipped: Skipped) -> Iterator[Image]:
        kind, where, fs = self.kind, self.where, self.fs
        if kind == "dir":
            assert isinstance(where, Path)
            for rel, path in _walk(where, recursive, skipped):
                yield Image(rel, path)
        elif kind == "file":
            yield Image(self.name, where)
        elif kind == "url-dir":
            for rel, name in remote.walk(fs, str(where), recursive, is_image_name, skipped):
                yield Image(rel, name, fs)
        elif kind == "url-glob":
            for rel, name in remote.glob(fs, str(where)):
                yield Image(rel, name, fs)
        elif kind == "url-file":
            yield Image(self.name, where, fs)
        else:
            rows = _text_rows(self) if kind == "text-list" else _parquet_rows(self)
            yield from _list_images(self, rows, skipped)


def _open(source: Source) -> Any:
    return open(source.where, "rb") if source.fs is None else source.fs.open(source.where, "rb")


def _text_rows(source: Source) -> Iterator[tuple[str | None, str]]:
    with _open(source) as f:
        for raw in f:
            line = raw.decode("utf-8").strip()
            if line and not line.startswith("#"):
                yield None, line


def _parquet_columns(source: Source, parquet: Any) -> list[str]:
    """The path (or uri) column of a Parquet list, and its id column if it has one."""
    names = parquet.schema_arrow.names
    column = next((c for c in PATH_COLUMNS if c in names), None)
    if column is None:
        raise ValueError(
            f"{source.name}: a Parquet list needs a 'path' or 'uri' column (and may have an "
            f"'id' column); it has {', '.join(names)}"
        )
    return [column, *(["id"] if "id" in names else [])]


def _parquet_file(f: Any) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(f"Parquet lists need pyarrow: {PARQUET_INSTALL_HINT} ({exc})") from None
    return pq.ParquetFile(f)


def _parquet_rows(source: Source) -> Iterator[tuple[str | None, str]]:
    with _open(source) as f:
        parquet = _parquet_file(f)
        columns = _parquet_columns(source, parquet)
        for batch in parquet.iter_batches(batch_size=LIST_BATCH_ROWS, columns=columns):
            paths = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(columns) == 2 else [None] * len(paths)
            for image_id, path in zip(ids, paths, strict=True):
                yield (None if image_id is None else str(image_id)), str(path or "")


def _list_images(
    source: Source, rows: Iterator[tuple[str | None, str]], skipped: Skipped
) -> Iterator[Image]:
    """The images of a list's ``(id or None, entry)`` rows, relative entries resolved against
    the list's location."""
    filesystems = remote.Filesystems()
    base = source.where.parent if isinstance(source.where, Path) else str(source.where)
    for number, (image_id, entry) in enumerate(rows, 1):
        if not entry:
            skipped(f"{source.name}: entry {number} has no path")
            continue
        image_id = entry if image_id is None else image_id
        if remote.scheme(entry) == "file":
            yield Image(image_id, _file_url_path(entry))
        elif remote.scheme(entry) is not None:
            fs, path = filesystems.resolve(entry)
            yield Image(image_id, path, fs)
        elif isinstance(base, Path):
            yield Image(image_id, base / entry)
        else:
            path = entry if entry.startswith("/") else f"{base.rsplit('/', 1)[0]}/{entry}"
            yield Image(image_id, path, source.fs)


def _file_url_path(url: str) -> Path:
    return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))


def _sniff_parquet(location: Path | str, fs: Any) -> bool:
    with open(location, "rb") if fs is None else fs.open(location, "rb") as f:
        return bytes(f.read(4)) == b"PAR1"


def _kind(suffix: str, as_list: bool, location: Path | str, fs: Any, single: str) -> str:
    if as_list:
        return "parquet-list" if _sniff_parquet(location, fs) else "text-list"
    if suffix in TEXT_LISTS:
        return "text-list"
    return "parquet-list" if suffix in PARQUET_LISTS else single


def open_source(given: Path | str, as_list: bool = False) -> Source:
    """Classify one input (checking it exists, that a URL's filesystem can be used and that a
    Parquet list has its columns); ``as_list``: a ``--list`` file, text or Parquet whatever
    its name."""
    source = _classify(given, as_list)
    if source.kind == "parquet-list":
        with _open(source) as f:
            _parquet_columns(source, _parquet_file(f))
    return source


def _classify(given: Path | str, as_list: bool) -> Source:
    text = str(given)
    protocol = remote.scheme(text) if isinstance(given, str) else None
    if protocol is None or protocol == "file":
        path = _file_url_path(text) if protocol == "file" else Path(given)
        if path.is_dir() and not as_list:
            return Source("dir", path, text)
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {given}")
        return Source(_kind(path.suffix.lower(), as_list, path, None, "file"), path, text)
    fs, where = remote.filesystem(text)
    if any(c in remote.GLOB_CHARS for c in where) and not as_list:
        return Source("url-glob", where, text, fs)
    if not as_list and fs.isdir(where):
        return Source("url-dir", where, text, fs)
    if not fs.exists(where):
        raise FileNotFoundError(f"no such file or directory: {given}")
    suffix = os.path.splitext(where)[1].lower()
    return Source(_kind(suffix, as_list, where, fs, "url-file"), where, text, fs)


def as_input(text: str | Path) -> Path | str:
    """A command-line input: a URL stays a string (a Path would fold its ``//``)."""
    return str(text) if remote.scheme(str(text)) is not None else Path(text)


def open_sources(inputs: Sequence[Path | str], lists: Sequence[Path | str] = ()) -> list[Source]:
    """Every input, checked before anything is extracted (a typo fails at once)."""
    return [open_source(i) for i in inputs] + [open_source(i, as_list=True) for i in lists]


def iter_images(sources: Sequence[Source], recursive: bool, skipped: Skipped) -> Iterator[Image]:
    """Every image of ``sources``, in order (see the module's docstring)."""
    for source in sources:
        yield from source.images(recursive, skipped)


def select(
    images: Iterable[Image],
    seen: SeenIds | None,
    skipped: Skipped,
    done: DoneIds | None = None,
    already: Callable[[], None] | None = None,
) -> Iterator[Image]:
    """The images of ``images`` still to extract, a chunk of ids looked up at a time: not
    with a line break in the id, not ``done`` (``already`` is called for each of those), not
    met before in ``seen`` (the same file again is skipped with a note; another file under
    the same id stops the run, whose output would hold one under the other's name).
    ``seen`` None: the ids are known to be distinct (one directory)."""
    for chunk in chunks(images):
        keep = [im for im in chunk if not _line_break(im, skipped)]
        keys = id_hashes([im.id for im in keep])
        status = np.zeros(len(keep), dtype=np.int8)
        if seen is not None:
            sources = [source_hash(im.source) for im in keep]
            status = seen.add(keys, np.asarray(sources, dtype=np.uint32))
        finished = done.contains(keys) if done is not None else np.zeros(len(keep), bool)
        for image, state, is_done in zip(keep, status.tolist(), finished.tolist(), strict=True):
            if state == DUPLICATE:
                skipped(f"{image.where}: id {image.id!r} is listed more than once")
            elif state == CLASH:
                raise ValueError(
                    f"{image.where} and an earlier input's file would both be stored as id "
                    f"{image.id!r}; extract these inputs into separate outputs"
                )
            elif is_done:
                if already is not None:
                    already()
            else:
                yield image


def _line_break(image: Image, skipped: Skipped) -> bool:
    if "\n" in image.id or "\r" in image.id:
        skipped(f"{image.where}: a line break in the name cannot be stored as an id")
        return True
    return False


def discover(inputs: Sequence[Path | str], recursive: bool) -> tuple[list[Image], list[str]]:
    """Every image of ``inputs`` as a list (small inputs and tests; runs stream them), in the
    run's order, and notes about entries that were skipped."""
    sources = open_sources(inputs)
    notes: list[str] = []
    seen = None if len(sources) == 1 and sources[0].unique_ids else SeenIds()
    images = list(select(iter_images(sources, recursive, notes.append), seen, notes.append))
    return images, notes
