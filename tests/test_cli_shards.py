"""The sharded output of a bulk extract (client/cli/shards.py): shards of a bounded number of
rows written once each, FixedSizeList Parquet columns in row groups (no 32-bit list offsets to
overflow), the options in the manifest and in each file's metadata, a resume that reads only
the ids of finished shards, and a crash's leftovers removed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from layertap.client.cli.shards import MANIFEST, Column, ShardedStore, read_npy_shards

META = {"model": "m", "nodes": ["layer4"], "pool": "gem", "dtype": "float32"}


def rows(n: int, start: int = 0, dim: int = 6) -> list[tuple[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(start)
    return [
        (f"img{i:04d}.jpg", {"layer4": rng.standard_normal(dim).astype(np.float32)})
        for i in range(start, start + n)
    ]


def store(path: Path, fmt: str = "parquet", **kw: int) -> ShardedStore:
    return ShardedStore(path, fmt, {"layer4": Column((6,), "float32")}, META, **kw)


def test_parquet_shards_row_groups_and_metadata(tmp_path: Path) -> None:
    out = store(tmp_path / "index", shard_rows=10, row_group_rows=4)
    written = rows(25)
    for row_id, row in written:
        out.add(row_id, row)
    out.flush()
    names = sorted(p.name for p in (tmp_path / "index").iterdir())
    assert names == [MANIFEST, "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    first = pq.ParquetFile(tmp_path / "index" / "part-00000.parquet")
    assert first.metadata.num_rows == 10 and first.metadata.num_row_groups == 3  # 4 + 4 + 2
    assert first.schema_arrow.field("layer4").type == pa.list_(pa.float32(), 6)
    assert json.loads(first.schema_arrow.metadata[b"layertap"])["options"] == META
    table = pq.read_table(tmp_path / "index")  # every shard; the manifest is skipped
    assert table.column("id").to_pylist() == [r for r, _ in written]
    got = np.stack(table.column("layer4").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(got, np.stack([row["layer4"] for _, row in written]))
    manifest = json.loads((tmp_path / "index" / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 5]


def test_resume_reads_ids_and_appends_new_shards(tmp_path: Path) -> None:
    out = store(tmp_path / "index", shard_rows=10)
    for row_id, row in rows(15):
        out.add(row_id, row)
    out.flush()
    again = store(tmp_path / "index", shard_rows=10)
    assert list(again.done_ids()) == [r for r, _ in rows(15)]
    assert again.rows == 15
    for row_id, row in rows(5, start=15):
        again.add(row_id, row)
    again.flush()
    assert [s["name"] for s in again.shards] == ["part-00000", "part-00001", "part-00002"]
    assert pq.read_table(tmp_path / "index").num_rows == 20


def test_a_crash_leaves_whole_shards_and_its_leftovers_go(tmp_path: Path) -> None:
    out = store(tmp_path / "index", shard_rows=10)
    for row_id, row in rows(12):  # one shard of 10 written, 2 rows open: lost in a crash
        out.add(row_id, row)
    leftovers = [tmp_path / "index" / ".part-00001.parquet.123.456.tmp",
                 tmp_path / "index" / "part-00001.parquet"]  # fmt: skip
    for path in leftovers:
        path.write_bytes(b"half a shard")
    again = store(tmp_path / "index", shard_rows=10)
    assert not any(p.exists() for p in leftovers)
    assert len(list(again.done_ids())) == 10


def test_other_options_or_shapes_are_refused(tmp_path: Path) -> None:
    out = store(tmp_path / "index")
    out.add(*rows(1)[0])
    out.flush()
    with pytest.raises(ValueError, match="'pool': 'avg'"):
        ShardedStore(tmp_path / "index", "parquet", {"layer4": Column((6,), "float32")},
                     {**META, "pool": "avg"})  # fmt: skip
    with pytest.raises(ValueError, match="columns="):
        ShardedStore(tmp_path / "index", "parquet", {"layer4": Column((7,), "float32")}, META)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        store(tmp_path / "other")


@pytest.mark.parametrize("dtype", ["float16", "int8", "float32"])
def test_npy_shards_and_every_dtype(tmp_path: Path, dtype: str) -> None:
    columns = {"a/b": Column((2, 3), dtype), "layer4": Column((4,), dtype)}
    out = ShardedStore(tmp_path / "npy", "npy", columns, META, shard_rows=3)
    want_a = np.arange(7 * 6).reshape(7, 2, 3).astype(dtype)
    want_b = np.arange(7 * 4).reshape(7, 4).astype(dtype)
    for i in range(7):
        out.add(f"id{i}", {"a/b": want_a[i], "layer4": want_b[i]})
    out.flush()
    ids, arrays = read_npy_shards(tmp_path / "npy")
    assert ids == [f"id{i}" for i in range(7)]
    np.testing.assert_array_equal(arrays["a/b"], want_a)
    assert arrays["layer4"].dtype == np.dtype(dtype)
    parquet = ShardedStore(tmp_path / "pq", "parquet", columns, META, shard_rows=3)
    for i in range(7):
        parquet.add(f"id{i}", {"a/b": want_a[i], "layer4": want_b[i]})
    parquet.flush()
    column = pq.read_table(tmp_path / "pq").column("a/b")
    assert column.type.value_type == {"float16": pa.float16(), "int8": pa.int8(),
                                      "float32": pa.float32()}[dtype]  # fmt: skip
    flat = np.stack(column.to_numpy(zero_copy_only=False)).reshape(7, 2, 3)
    np.testing.assert_array_equal(flat, want_a)


# --------------------------------------------------------------------------- the bulk run


def _collection(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{i:03d}.jpg").write_bytes(f"image {i}".encode())
    return root


def _rows_of(out: Path) -> dict[str, list[float]]:
    table = pq.read_table(out)
    return dict(zip(table.column("id").to_pylist(), table.column("a").to_pylist(), strict=True))


def test_a_bulk_run_into_a_directory_appends_shards_and_resumes(tmp_path: Path) -> None:
    from test_cli_extract_dir import StandIn, _opts

    from layertap.client.cli import extract_dir as bulk

    src = _collection(tmp_path / "src", 10)
    out = tmp_path / "index"
    opts = _opts([src], out, shard_rows=3)
    opts.nodes = ["a"]
    assert bulk.run(StandIn(), opts) == 0  # type: ignore[arg-type]
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert manifest["options"]["model"] == "m" and manifest["columns"]["a"]["shape"] == [8]
    _collection(tmp_path / "src", 13)  # three more images arrive
    client = StandIn()
    assert bulk.run(client, opts) == 0  # type: ignore[arg-type]
    assert client.sent == ["010.jpg", "011.jpg", "012.jpg"]  # only the new ones
    whole = _opts([src], tmp_path / "whole", shard_rows=5)
    whole.nodes = ["a"]
    assert bulk.run(StandIn(), whole) == 0  # type: ignore[arg-type]
    assert _rows_of(out) == _rows_of(tmp_path / "whole")  # the same set as one whole run


KILLED = """
import sys, time
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from test_cli_extract_dir import StandIn, _opts
from layertap.client.cli import extract_dir as bulk

class Slow(StandIn):
    def extract_many(self, items, **kwargs):
        for item in super().extract_many(items, **kwargs):
            time.sleep(0.01)
            yield item

opts = _opts([Path(sys.argv[1])], Path(sys.argv[2]), shard_rows=7)
opts.nodes = ["a"]
bulk.run(Slow(), opts)
"""


def test_a_kill_at_any_moment_loses_only_the_open_shard(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from test_cli_extract_dir import StandIn, _opts

    from layertap.client.cli import extract_dir as bulk

    src = _collection(tmp_path / "src", 120)
    out = tmp_path / "index"
    tests = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(src), str(out), tests])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / "part-00003.parquet").exists():
        time.sleep(0.01)
    time.sleep(0.037)  # somewhere inside a later shard
    proc.kill()  # SIGKILL: nothing is flushed
    proc.wait(30)
    survived = json.loads((out / MANIFEST).read_text())["shards"]
    assert 4 <= len(survived) < 18  # whole shards of 7 made it; the open one did not
    opts = _opts([src], out, shard_rows=7)
    opts.nodes = ["a"]
    client = StandIn()
    assert bulk.run(client, opts) == 0  # type: ignore[arg-type]
    assert len(client.sent) == 120 - 7 * len(survived)  # the rest, each image once
    whole = _opts([src], tmp_path / "whole", shard_rows=50)
    whole.nodes = ["a"]
    assert bulk.run(StandIn(), whole) == 0  # type: ignore[arg-type]
    rows = _rows_of(out)
    assert len(pq.read_table(out)) == 120 == len(rows)  # no id twice
    assert rows == _rows_of(tmp_path / "whole")


def test_shard_and_row_group_sizes_are_the_runs_to_choose(tmp_path: Path) -> None:
    from test_cli_extract_dir import StandIn, _opts

    from layertap.client.cli import extract_dir as bulk

    src = _collection(tmp_path / "src", 11)
    opts = _opts([src], tmp_path / "index", shard_rows=5, row_group_rows=2)
    assert bulk.run(StandIn(), opts) == 0  # type: ignore[arg-type]
    files = sorted((tmp_path / "index").glob("part-*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [5, 5, 1]
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [3, 3, 1]
