"""Inputs of a bulk `layertap extract` beyond a directory, and the run at scale: text and Parquet
lists, fsspec URLs (file://, memory://), streaming discovery, reading ahead in order, the
compact done-set on resume, the progress bar and --summary-json. No model: the stand-in
client of test_cli_extract_dir computes a vector from each image's bytes.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cli_extract_dir import StandIn, _load, _opts

from layertap.client.cli import extract_dir as bulk
from layertap.client.cli import main
from layertap.client.cli import sources as src
from layertap.client.cli.idsets import (
    CLASH,
    DUPLICATE,
    LEVEL_ROWS,
    NEW,
    DoneIds,
    SeenIds,
    chunks,
    id_hashes,
)
from layertap.client.cli.prefetch import prefetch
from layertap.client.cli.progress import Progress

fsspec = pytest.importorskip("fsspec")


def _files(root: Path, names: list[str]) -> Path:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"image {name}".encode())
    return root


def _vector(name: str, node: str = "a") -> np.ndarray:
    return StandIn.vector(f"image {name}".encode(), node)


def _shard_rows(out: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(out)
    return table.column("id").to_pylist(), np.array(table.column("a").to_pylist())


@pytest.fixture
def bucket() -> Iterator[str]:
    """A fresh memory:// bucket (the memory filesystem is global to the process)."""
    fs = fsspec.filesystem("memory")
    name = f"bucket-{uuid.uuid4().hex[:8]}"
    yield name
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


# --------------------------------------------------------------------------- lists


def test_text_lists_resolve_against_their_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = _files(tmp_path / "photos", ["a.jpg", "sub/b.png", "c.webp", "z.gif"])
    lines = ["# a comment", "", "a.jpg", "  sub/b.png  ", str(photos / "c.webp"), "gone.jpg"]
    listed = photos / "list.txt"
    listed.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.npz"
    assert bulk.run(StandIn(), _opts([listed], out)) == 1  # type: ignore[arg-type]
    assert f"{photos / 'gone.jpg'}: unreadable" in capsys.readouterr().err
    ids, arrays = _load(out)
    assert ids == sorted(["a.jpg", "sub/b.png", (photos / "c.webp").as_posix()])
    np.testing.assert_array_equal(arrays["a"][ids.index("sub/b.png")], _vector("sub/b.png"))
    # --list takes a list whatever its name; a rerun sends only what is missing
    other = tmp_path / "more.lst"
    other.write_text(f"{photos / 'z.gif'}\n{photos / 'a.jpg'}\n")
    client = StandIn()
    opts = _opts([listed], out, lists=[other])
    assert bulk.run(client, opts) == 1  # type: ignore[arg-type]
    assert client.sent == [str(photos / "z.gif"), str(photos / "a.jpg")]  # gone.jpg: unread


def test_parquet_lists_with_an_id_column(tmp_path: Path) -> None:
    photos = _files(tmp_path / "photos", ["a.jpg", "b.jpg", "c.jpg"])
    names = ["a.jpg", "b.jpg", "c.jpg"]
    ids = [f"item-{i:03d}" for i in range(50)]
    paths = [names[i % 3] for i in range(50)]  # many ids, three files
    listed = photos / "items.parquet"
    pq.write_table(pa.table({"id": ids, "path": paths, "extra": list(range(50))}), listed)
    out = tmp_path / "index"
    opts = _opts([listed], out, shard_rows=16)
    opts.nodes = ["a"]
    client = StandIn()
    assert bulk.run(client, opts) == 0  # type: ignore[arg-type]
    assert client.sent == ids  # in the list's order
    got, vectors = _shard_rows(out)
    assert got == ids
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(vectors[i], _vector(path))

    # a `uri` column without ids: the entry is the id; a repeated id from the same file is
    # skipped with a note, from another file it stops the run
    uris = tmp_path / "uris.parquet"
    entries = [str(photos / "a.jpg"), str(photos / "b.jpg"), str(photos / "a.jpg")]
    pq.write_table(pa.table({"uri": entries}), uris)
    notes: list[str] = []
    images, notes = src.discover([uris], recursive=False)
    assert [i.id for i in images] == entries[:2] and "listed more than once" in notes[0]
    clash = tmp_path / "clash.parquet"
    pq.write_table(pa.table({"id": ["x", "x"], "path": ["a.jpg", "photos/b.jpg"]}), clash)
    with pytest.raises(ValueError, match="both be stored as id 'x'"):
        src.discover([clash], recursive=False)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"file": ["a.jpg"]}), bad)
    with pytest.raises(ValueError, match="'path' or 'uri' column"):
        src.discover([bad], recursive=False)


# --------------------------------------------------------------------------- URLs


def test_memory_and_file_urls(tmp_path: Path, bucket: str) -> None:
    fs = fsspec.filesystem("memory")
    layout = ["a.jpg", "sub/c.png", "sub/deep/d.jpg", ".hidden.jpg", "notes.txt", "z b/e.jpg"]
    for name in layout:
        fs.pipe(f"/{bucket}/photos/{name}", f"image {name}".encode())
    root = f"memory://{bucket}/photos"
    images, _ = src.discover([root], recursive=True)
    assert [i.id for i in images] == ["a.jpg", "sub/c.png", "sub/deep/d.jpg", "z b/e.jpg"]
    assert [i.id for i in src.discover([root + "/"], recursive=False)[0]] == ["a.jpg"]
    assert [i.id for i in src.discover([root + "/*/*.png"], recursive=False)[0]] == ["sub/c.png"]
    single = f"{root}/sub/c.png"
    assert [i.id for i in src.discover([single], recursive=False)[0]] == [single]
    fs.pipe(f"/{bucket}/list.txt", b"photos/a.jpg\nphotos/sub/c.png\n")
    listed, _ = src.discover([f"memory://{bucket}/list.txt"], recursive=False)
    assert [(i.id, i.read()) for i in listed] == [
        ("photos/a.jpg", b"image a.jpg"),
        ("photos/sub/c.png", b"image sub/c.png"),
    ]

    out = tmp_path / "remote.npz"
    opts = _opts([root], out, recursive=True)
    assert bulk.run(StandIn(), opts) == 0  # type: ignore[arg-type]
    ids, arrays = _load(out)
    assert ids == ["a.jpg", "sub/c.png", "sub/deep/d.jpg", "z b/e.jpg"]
    np.testing.assert_array_equal(arrays["b"][1], _vector("sub/c.png", "b"))

    # the same tree on disk, as a file:// URL, gives the same file
    local = _files(tmp_path / "photos", layout)
    same = tmp_path / "local.npz"
    assert bulk.run(StandIn(), _opts([local.as_uri()], same, recursive=True)) == 0  # type: ignore[arg-type]
    assert _load(same)[0] == ids
    np.testing.assert_array_equal(_load(same)[1]["a"], arrays["a"])


def test_unknown_schemes_and_missing_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=r"unknown URL scheme nosuch://"):
        src.open_sources(["nosuch://bucket/x.jpg"])
    with pytest.raises(FileNotFoundError, match="memory://"):
        src.open_sources([f"memory://{uuid.uuid4().hex}/x.jpg"])
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"s3:// URLs need the s3fs package: pip install s3fs"):
            src.open_sources(["s3://bucket/photos/"])
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if not installed
    with pytest.raises(ValueError, match=r"need fsspec: pip install 'layertap\[fsspec\]'"):
        src.open_sources(["gs://bucket/photos/"])
    # the command says so before connecting work starts, exit status 2
    _fake_client(monkeypatch)
    argv = ["extract", "gs://bucket/photos/", "--model", "m", "-n", "a", "-o", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "layertap[fsspec]" in capsys.readouterr().err


# --------------------------------------------------------------------------- streaming


def test_the_walk_streams_in_sorted_id_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [
        "a.jpg",
        "a b/x.jpg",
        "a/x.jpg",
        "a-b.jpg",
        "a0.jpg",
        "b/c/d.jpg",
        "B.jpg",
        "a/y/z.jpg",
    ]
    root = _files(tmp_path / "tree", names)
    images, _ = src.discover([root], recursive=True)
    assert [i.id for i in images] == sorted(names)  # what sorting every id would give
    listed: list[str] = []
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        listed.append(os.path.relpath(path, root))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    stream = src.iter_images(src.open_sources([root]), True, lambda note: None)
    assert next(stream).id == "B.jpg"
    assert listed == ["."]  # one directory listed so far, not the tree
    assert next(stream).id == "a b/x.jpg" and listed == [".", "a b"]


def test_prefetch_reads_ahead_in_order() -> None:
    rng = random.Random(7)
    delays = [rng.uniform(0, 0.004) for _ in range(60)]
    lock = threading.Lock()
    started: list[int] = []
    handed = [0]
    most_ahead = [0]

    def read(i: int) -> int:
        with lock:
            started.append(i)
            most_ahead[0] = max(most_ahead[0], len(started) - handed[0])
        time.sleep(delays[i])
        if i == 13:
            raise OSError(5, "Input/output error")
        return i * i

    got = []
    for item, value in prefetch(range(60), read, threads=4, ahead=6):
        handed[0] += 1
        got.append((item, value))
    assert [i for i, _ in got] == list(range(60))  # in order, whatever finished first
    assert [v for i, v in got if i != 13] == [i * i for i in range(60) if i != 13]
    assert isinstance(got[13][1], OSError)  # an unreadable item comes with its error
    assert most_ahead[0] <= 6  # never more than `ahead` read and not handed out
    assert sorted(started) == list(range(60))

    # closed early: the items after the window are never pulled
    pulled: list[int] = []

    def items() -> Iterator[int]:
        for i in range(1000):
            pulled.append(i)
            yield i

    stream = prefetch(items(), lambda i: i, threads=2, ahead=5)
    assert [next(stream)[0] for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert len(pulled) <= 8
    assert list(prefetch(range(3), lambda i: -i, threads=0, ahead=0)) == [(0, 0), (1, -1), (2, -2)]


# --------------------------------------------------------------------------- done-set


def test_id_sets_are_compact() -> None:
    ids = [f"photos/{i:07d}.jpg" for i in range(300_000)]
    done = DoneIds.from_ids(iter(ids))
    assert done.nbytes == 8 * len(ids) and len(done) == len(ids)
    assert all(len(level) <= LEVEL_ROWS for level in done.levels)
    assert ids[0] in done and ids[-1] in done and "photos/x.jpg" not in done
    probe = [*ids[::997], "nope", "photos/0300000.jpg"]
    assert done.contains(id_hashes(probe)).tolist() == [True] * (len(probe) - 2) + [False] * 2

    seen = SeenIds()
    for chunk in chunks(ids[:100_000]):
        assert (seen.add(id_hashes(chunk), np.ones(len(chunk), np.uint32)) == NEW).all()
    assert seen.nbytes == 12 * 100_000 and len(seen.levels) < 12
    again = seen.add(id_hashes(ids[:5]), np.array([1, 1, 2, 1, 1], np.uint32))
    assert again.tolist() == [DUPLICATE, DUPLICATE, CLASH, DUPLICATE, DUPLICATE]
    inner = seen.add(id_hashes(["n", "m", "n", "n"]), np.array([4, 4, 4, 5], np.uint32))
    assert inner.tolist() == [NEW, NEW, DUPLICATE, CLASH]


class _Forgetful(list):  # type: ignore[type-arg]
    """A stand-in's record of what it was sent, keeping nothing (it would grow with the run)."""

    def append(self, item: object) -> None:
        return None


def _list_run(tmp_path: Path, n: int, name: str) -> float:
    """Peak traced memory (bytes) of a run over a Parquet list of n ids, three files."""
    photos = _files(tmp_path / "photos", ["a.jpg", "b.jpg", "c.jpg"])
    listed = tmp_path / f"{name}.parquet"
    paths = [str(photos / "abc"[i % 3]) + ".jpg" for i in range(n)]
    pq.write_table(pa.table({"id": [f"{name}/{i:08d}" for i in range(n)], "path": paths}), listed)
    opts = _opts([listed], tmp_path / name, shard_rows=500)
    opts.nodes = ["a"]
    client = StandIn()
    client.sent = _Forgetful()  # type: ignore[assignment]
    tracemalloc.start()
    try:
        assert bulk.run(client, opts) == 0  # type: ignore[arg-type]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_on_a_long_list(tmp_path: Path) -> None:
    small = _list_run(tmp_path, 2_000, "small")
    large = _list_run(tmp_path, 20_000, "large")
    # 18,000 more ids cost 12 bytes each, and up to about as much again while two levels of
    # hashes merge; a set of their strings would cost ~100 bytes each
    assert (large - small) / 18_000 < 64, (small, large)


def test_a_resumed_list_sends_only_new_ids(tmp_path: Path) -> None:
    photos = _files(tmp_path / "photos", ["a.jpg", "b.jpg"])
    listed = photos / "items.parquet"
    ids = [f"k{i:03d}" for i in range(40)]
    paths = ["a.jpg" if i % 2 else "b.jpg" for i in range(40)]
    pq.write_table(pa.table({"id": ids[:25], "path": paths[:25]}), listed)
    opts = _opts([listed], tmp_path / "index", shard_rows=7)
    opts.nodes = ["a"]
    assert bulk.run(StandIn(), opts) == 0  # type: ignore[arg-type]
    pq.write_table(pa.table({"id": ids, "path": paths}), listed)  # 15 more arrive
    client = StandIn()
    summary = tmp_path / "summary.json"
    opts.summary_json = summary
    assert bulk.run(client, opts) == 0  # type: ignore[arg-type]
    assert client.sent == ids[25:]
    report = json.loads(summary.read_text())
    assert (report["added"], report["already_present"], report["rows"]) == (15, 25, 40)
    assert sorted(_shard_rows(tmp_path / "index")[0]) == ids


# --------------------------------------------------------------------------- reporting


def test_summary_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _files(tmp_path / "src", [f"{i}.jpg" for i in range(5)])
    (root / "bad.jpg").write_bytes(b"bad bytes")
    (root / "empty.jpg").write_bytes(b"")
    summary = tmp_path / "reports" / "run.json"
    opts = _opts([root], tmp_path / "o.parquet", summary_json=summary)
    assert bulk.run(StandIn(), opts) == 1  # type: ignore[arg-type]
    assert re.search(r"\d+\.\d s, \d+\.\d images/s", capsys.readouterr().out)
    report = json.loads(summary.read_text())
    assert report["finished"] is True and report["error"] is None
    assert (report["added"], report["already_present"], report["failed"]) == (5, 0, 2)
    assert report["rows"] == 5 and report["output"] == str(tmp_path / "o.parquet")
    reasons = {Path(f["path"]).name: f["reason"] for f in report["failures"]}
    assert reasons == {"bad.jpg": "INVALID_ARGUMENT: image 0", "empty.jpg": "empty file"}
    assert report["seconds"] >= 0 and report["images_per_second"] >= 0
    assert {f["id"] for f in report["failures"]} == {"bad.jpg", "empty.jpg"}

    class Interrupted(StandIn):
        def extract_many(self, items: Any, **kwargs: Any) -> Iterator[Any]:
            yield from iter(())
            raise KeyboardInterrupt

    (root / "5.jpg").write_bytes(b"image 5")
    with pytest.raises(KeyboardInterrupt):
        bulk.run(Interrupted(), opts)  # type: ignore[arg-type]
    report = json.loads(summary.read_text())
    assert report["finished"] is False and report["error"].startswith("KeyboardInterrupt")
    assert report["already_present"] == 0 and report["rows"] == 5


def test_progress_shows_rate_eta_and_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _files(tmp_path / "src", [f"{i}.jpg" for i in range(5)])
    (root / "empty.jpg").write_bytes(b"")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)

    class Slow(StandIn):
        def extract_many(self, items: Any, **kwargs: Any) -> Iterator[Any]:
            for pair in super().extract_many(items, **kwargs):
                time.sleep(0.02)  # the background count finishes first: a total, an ETA
                yield pair

    opts = _opts([root], tmp_path / "o.npz")
    opts.progress = True
    assert bulk.run(Slow(), opts) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "empty.jpg: empty file" in err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"6/6 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+img/s, failed=1\]", last), last

    # the total (so the ETA) comes from a count on another thread, the done ids left out
    progress = Progress(True)
    todo = [src.Image(f"{i}.jpg", Path(f"{i}.jpg")) for i in range(10)]
    progress.count_in_background(lambda: iter(todo), DoneIds.from_ids(["2.jpg", "7.jpg"]))
    assert progress.bar is not None and progress.bar.total is None
    assert progress._counter is not None
    progress._counter.join(10)
    progress.advance()
    assert progress.bar.total == 8 and progress.bar.n == 1
    progress.close(complete=False)
    assert "1/8 [" in capsys.readouterr().err


# --------------------------------------------------------------------------- the command


class _Connected:
    def __init__(self, client: StandIn) -> None:
        self.client = client

    def __enter__(self) -> StandIn:
        return self.client

    def __exit__(self, *exc: object) -> None:
        return None


def _fake_client(monkeypatch: pytest.MonkeyPatch) -> list[StandIn]:
    made: list[StandIn] = []

    def connect(target: str, **kwargs: Any) -> _Connected:
        made.append(StandIn())
        return _Connected(made[-1])

    monkeypatch.setattr("layertap.client.cli.FeatureClient", connect)
    return made


def test_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    made = _fake_client(monkeypatch)
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "any")  # (so that the test's end unsets it)
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL")
    photos = _files(tmp_path / "photos", ["a.jpg", "b.jpg", "c.jpg"])
    (photos / "list.txt").write_text("a.jpg\nb.jpg\n")
    (tmp_path / "more").write_text(f"{photos / 'c.jpg'}\n")
    out = tmp_path / "index"
    summary = tmp_path / "s.json"
    base = ["extract", "--model", "m", "-n", "a", "--pool", "gem", "--no-progress"]
    argv = [*base, str(photos / "list.txt"), "--list", str(tmp_path / "more"), "-o", str(out)]
    argv += ["--read-threads", "2", "--read-ahead", "3", "--summary-json", str(summary)]
    assert main(argv) == 0
    assert made[-1].sent == ["a.jpg", "b.jpg", str(photos / "c.jpg")]
    assert json.loads(summary.read_text())["rows"] == 3
    assert os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system"  # pages freed are given back
    assert main([*base, str(photos / "list.txt")]) == 2  # a list means the bulk run: needs -o
    assert "-o/--output" in capsys.readouterr().err
    assert main([*base, "-o", str(out)]) == 2
    assert "nothing to extract" in capsys.readouterr().err
    url = (photos / "a.jpg").as_uri()
    assert main([*base, url, "-o", str(tmp_path / "one.npz")]) == 0
    assert made[-1].sent == [url]
