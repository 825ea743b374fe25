"""URL inputs of a bulk run through fsspec (``pip install 'layertap[fsspec]'``, imported only
when a URL is given): ``s3://`` (s3fs), ``gs://`` (gcsfs), ``az://`` / ``abfs://`` (adlfs),
``https://`` (aiohttp), ``memory://``, and any other protocol fsspec knows. ``file://`` URLs
are read as local paths (:mod:`.sources`) and need nothing extra.

A URL names one image, a list (``.txt`` / ``.parquet``), a directory (a prefix of an object
store) walked like a local one, or a glob (``s3://b/photos/*/*.jpg``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from .walk import sorted_walk

FSSPEC_INSTALL_HINT = "pip install 'layertap[fsspec]'"

# The package each common protocol needs beside fsspec.
PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "adl": "adlfs",
    "http": "aiohttp",
    "https": "aiohttp",
    "sftp": "paramiko",
    "hf": "huggingface_hub",
}

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
GLOB_CHARS = frozenset("*?[")


def scheme(text: str) -> str | None:
    """The URL scheme of ``text`` in lower case (``s3``), or None for a plain path."""
    match = _URL.match(text)
    return match.group(1).lower() if match else None


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path on it; a ValueError that names what to
    install when fsspec or the protocol's package is missing, or the scheme is unknown."""
    protocol = scheme(url) or "file"
    try:
        import fsspec
        import fsspec.core
    except ImportError:
        raise ValueError(f"{url}: URL inputs need fsspec: {FSSPEC_INSTALL_HINT}") from None
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ValueError(
            f"{url}: unknown URL scheme {protocol}:// (fsspec has no such protocol; use a "
            "local path, file://, s3://, gs://, az://, https:// ...)"
        ) from None
    except ImportError as exc:
        package = PACKAGES.get(protocol)
        needs = f"the {package} package: pip install {package}" if package else "a package"
        raise ValueError(f"{url}: {protocol}:// URLs need {needs} ({exc})") from None
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


class Filesystems:
    """One filesystem per protocol for the URLs of a list (url_to_fs per entry is slow)."""

    def __init__(self) -> None:
        self._by_protocol: dict[str, Any] = {}

    def resolve(self, url: str) -> tuple[Any, str]:
        protocol = scheme(url) or "file"
        fs = self._by_protocol.get(protocol)
        if fs is None:
            fs, path = filesystem(url)
            self._by_protocol[protocol] = fs
            return fs, path
        return fs, fs._strip_protocol(url)


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def walk(
    fs: Any,
    root: str,
    recursive: bool,
    wanted: Callable[[str], bool],
    skipped: Callable[[str], None],
) -> Iterator[tuple[str, str]]:
    """``(id, path)`` of the files under ``root`` whose name ``wanted`` accepts, ids relative to
    ``root``, in the order of the sorted ids (like a local directory: see :mod:`.sources`);
    one listing (``ls``) per directory, so an object store's prefix streams page by page."""

    def listing(directory: str) -> list[str]:
        try:
            entries = fs.ls(directory, detail=True)
        except OSError as exc:
            skipped(f"{fs.unstrip_protocol(directory)}: {exc}")
            return []
        keys = []
        here = directory.rstrip("/")
        for entry in entries:
            name = str(entry["name"]).rstrip("/")
            base = _base(name)
            if name == here or not base or base.startswith("."):
                continue
            if entry.get("type") == "directory":
                if recursive:
                    keys.append(base + "/")
            elif wanted(base):
                keys.append(base)
        keys.sort()
        return keys

    yield from sorted_walk(root.rstrip("/") or "/", listing, _join)


def glob(fs: Any, pattern: str) -> Iterator[tuple[str, str]]:
    """``(id, path)`` of the files matching ``pattern``, sorted, ids relative to the
    directory before the first wildcard; hidden names (``.x``) are left out."""
    head = pattern
    for i, char in enumerate(pattern):
        if char in GLOB_CHARS:
            head = pattern[:i]
            break
    prefix = head[: head.rfind("/") + 1]
    matches = fs.glob(pattern, detail=True)
    for name in sorted(matches):
        if matches[name].get("type") == "directory":
            continue
        rel = name[len(prefix) :] if name.startswith(prefix) else _base(name)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        yield rel, name
