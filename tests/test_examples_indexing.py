"""examples/indexing/ run as users run them (each script in a subprocess, `layertap extract`
through the CLI) against a real server: mobilenet_v2 with its real ImageNet weights, on the
demo collection sample_photos.py writes (45 images: 18 photos of scikit-image, scikit-learn and
matplotlib, 2 x 2 tiles of 6 of them, edited copies of 3 more), as sharded Parquet outputs of
3 shards (float32 and int8 descriptors: features.18, GeM, L2-normalised)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MOBILENET, RunningServer, serving

from layertap.server.settings import Settings

pytest.importorskip("faiss")
pytest.importorskip("lancedb")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "indexing"
DESCRIPTOR = ["--model", "m", "-n", "features.18", "--pool", "gem", "--normalize"]
REPOSTED = ("flower", "grace_hopper", "rocket")
Matches = dict[str, list[tuple[str, float]]]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=os.environ
    )
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done


def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(sys.executable, str(EXAMPLES / name), *args)


def _query(script: str, index: Path, server: RunningServer, *args: str) -> Matches:
    """{query image relative to the demo folder: [(id, score), ...]} from --json output."""
    done = _script(script, str(index), *args, "--json", "--target", server.target)
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    return {
        re.sub(r".*/(collection|queries)/", r"\1/", a["query"]): [(i, s) for i, s in a["matches"]]
        for a in answers
    }


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serving(Settings(port=0, models=(MOBILENET,))) as running:
        yield running


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    done = _script("sample_photos.py", str(root))
    assert "45 images in" in done.stdout and "3 queries" in done.stdout
    return root


def _extract(server: RunningServer, demo: Path, out: Path, *extra: str) -> Path:
    layertap = [sys.executable, "-m", "layertap.client.cli", "--target", server.target]
    args = [str(demo / "collection"), "-r", "-o", str(out), *DESCRIPTOR, *extra]
    _run(*layertap, "extract", *args, "--shard-rows", "16", "--no-progress")
    manifest = json.loads((out / "_manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 13], manifest["shards"]
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-0000{i}.parquet" for i in range(3)]
    return out


@pytest.fixture(scope="module")
def shards(server: RunningServer, demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _extract(server, demo, tmp_path_factory.mktemp("float32") / "shards")


@pytest.fixture(scope="module")
def shards_int8(
    server: RunningServer, demo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return _extract(server, demo, tmp_path_factory.mktemp("int8") / "shards", "--dtype", "int8")


@pytest.fixture(scope="module")
def flat(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faiss") / "flat"
    done = _script("build_faiss.py", str(shards), "-o", str(out))
    assert "indexed 45 vectors (1280-d float32, IndexFlatIP)" in done.stdout, done.stdout
    return out


@pytest.fixture(scope="module")
def flat_answers(flat: Path, server: RunningServer, demo: Path) -> Matches:
    """Every indexed image and every query image against the flat index, top 10."""
    return _query("query_faiss.py", flat, server, str(demo), "-k", "10")


def test_faiss_flat_finds_an_exact_duplicate_first(
    flat: Path, flat_answers: Matches, server: RunningServer, demo: Path
) -> None:
    assert len(flat_answers) == 48
    for name, matches in flat_answers.items():
        if name.startswith("collection/"):
            (first, score), (_, second) = matches[:2]
            assert first == name.removeprefix("collection/"), (name, matches)
            assert abs(score - 1.0) < 1e-4 and second < score - 0.05, (name, matches)
    ids = (flat / "ids.txt").read_text().splitlines()
    assert len(ids) == 45 and len(set(ids)) == 45 and "photos/astronaut.jpg" in ids
    info = json.loads((flat / "layertap.json").read_text())
    assert info["kind"] == "flat" and info["options"]["nodes"] == ["features.18"]

    # the human-readable form
    image = str(demo / "collection" / "photos" / "chelsea.jpg")
    done = _script("query_faiss.py", str(flat), image, "-k", "2", "--target", server.target)
    lines = done.stdout.splitlines()
    assert lines[0] == f"query {image}" and len(lines) == 3
    assert re.match(r"\s+1\.\s+1\.0000\s+photos/chelsea\.jpg$", lines[1]), lines

    # a server whose weights differ from the extract's is refused, not silently compared
    info["options"]["weights_sha256"] = "0" * 64
    other = flat.parent / "other-weights"
    other.mkdir()
    for name in ("index.faiss", "ids.txt"):
        (other / name).write_bytes((flat / name).read_bytes())
    (other / "layertap.json").write_text(json.dumps(info))
    args = [str(EXAMPLES / "query_faiss.py"), str(other), image, "--target", server.target]
    refused = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "other weights" in refused.stderr, refused.stderr


# IVF-PQ on 45 vectors: one list (nlist 1) and PQ codes of 320 sub-vectors x 4 bits (16
# centroids trained on 45 vectors; nbits 8 needs 39 x 256 of them). Measured recall@10
# against the flat index: 0.818 (build_faiss.py --recall-check and the queries below agree).
IVFPQ_RECALL_FLOOR = 0.8


def test_faiss_ivfpq_recall_against_flat(
    shards: Path, flat_answers: Matches, server: RunningServer, demo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ivfpq"
    done = _script(
        "build_faiss.py", str(shards), "-o", str(out), "--kind", "ivfpq", "--recall-check", "45"
    )
    assert "IndexIVFPQ nlist=1 m=320 nbits=4 nprobe=1 trained on 45" in done.stdout, done.stdout
    assert "training vectors for 16 PQ centroids" in done.stderr  # said once, not per sub-vector
    assert done.stderr.count("\n") == 1, done.stderr
    printed = float(re.search(r"recall@10 against exact search: ([\d.]+)", done.stdout)[1])
    assert printed >= IVFPQ_RECALL_FLOOR, done.stdout
    approx = _query("query_faiss.py", out, server, str(demo / "collection"), "-k", "10")
    assert len(approx) == 45
    hits = sum(len({i for i, _ in approx[q]} & {i for i, _ in flat_answers[q]}) for q in approx)
    recall = hits / (10 * len(approx))
    assert recall >= IVFPQ_RECALL_FLOOR, recall
    assert abs(recall - printed) < 0.05, (recall, printed)


def test_lancedb_top1_equals_faiss_flat_top1(
    shards: Path, flat_answers: Matches, server: RunningServer, demo: Path, tmp_path: Path
) -> None:
    db = tmp_path / "lancedb"
    done = _script("build_lancedb.py", str(shards), "-o", str(db))
    assert "loaded 45 vectors (1280-d float32)" in done.stdout, done.stdout
    assert "no vector index (exact search)" in done.stdout and not done.stderr.strip()
    answers = _query("query_lancedb.py", db, server, str(demo), "-k", "3")
    assert answers.keys() == flat_answers.keys()
    for name, matches in answers.items():
        assert [i for i, _ in matches] == [i for i, _ in flat_answers[name][:3]], name
        for (_, got), (_, want) in zip(matches, flat_answers[name], strict=False):
            assert abs(got - want) < 1e-4, (name, matches, flat_answers[name])

    # with an IVF-PQ index (forced: the table is far below --index-min-rows), re-ranked
    done = _script("build_lancedb.py", str(shards), "-o", str(db), "--index", "ivfpq")
    assert "IVF-PQ index (cosine, 7 partitions, 160 sub-vectors)" in done.stdout, done.stdout
    some = [demo / "queries", *sorted((demo / "collection" / "photos").glob("c*.jpg"))]
    indexed = _query("query_lancedb.py", db, server, *map(str, some), "-k", "1")
    assert len(indexed) == 10, indexed  # 3 originals of reposts, 7 indexed photos
    for name, matches in indexed.items():
        assert matches[0][0] == flat_answers[name][0][0], (name, matches, flat_answers[name])


def test_int8_copy_detection(
    shards_int8: Path, flat_answers: Matches, server: RunningServer, demo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "int8"
    done = _script("build_faiss.py", str(shards_int8), "-o", str(out))
    assert "(1280-d int8, IndexScalarQuantizer int8)" in done.stdout, done.stdout
    size = (out / "index.faiss").stat().st_size
    assert 45 * 1280 <= size < 45 * 1280 + 4096  # one byte per value on disk
    answers = _query("query_faiss.py", out, server, str(demo), "-k", "3")
    for name in REPOSTED:  # the original photo finds its edited copy first
        (first, score), (_, second), _ = answers[f"queries/{name}.jpg"]
        assert first == f"reposts/{name}.jpg", (name, answers[f"queries/{name}.jpg"])
        assert score > second + 0.05, (name, answers[f"queries/{name}.jpg"])
    for name, matches in answers.items():
        # the same ranking as the float32 flat index, scores within int8 rounding
        assert matches[0][0] == flat_answers[name][0][0], (name, matches)
        assert abs(matches[0][1] - flat_answers[name][0][1]) < 0.02, (name, matches)
    first, score = answers["collection/photos/coffee.jpg"][0]
    assert first == "photos/coffee.jpg" and 0.99 < score < 1.02  # |round(127 x)|^2 / 127^2
