"""The examples run as users run them (scripts in a subprocess) on real photos with
mobilenet_v2's real ImageNet weights, and their output is checked, not just their exit code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RunningServer, photo
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("retrieval")
    (root / "more").mkdir()
    for name in ("astronaut", "chelsea", "coffee", "china", "rocket"):
        img = Image.fromarray(photo(name))
        img.thumbnail((320, 320))
        img.save(root / f"{name}.jpg", quality=90)
    img = Image.fromarray(photo("grace_hopper"))
    img.thumbnail((320, 320))
    img.save(root / "more" / "grace_hopper.png")
    return root


def test_retrieval_index_and_query(
    small_server: RunningServer, photo_folder: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index.npz"
    done = _run(
        EXAMPLES / "retrieval" / "index.py",
        str(photo_folder),
        "-r",
        "-o",
        str(index),
        "--target",
        small_server.target,
    )
    assert done.returncode == 0, done.stderr
    assert "indexed 6 images (1280-d, mobilenet_v2 features gem)" in done.stdout

    # an indexed image, and an edited copy (mirrored, shrunk) of another one
    copy = tmp_path / "chelsea_copy.png"
    chelsea = Image.open(photo_folder / "chelsea.jpg")
    chelsea.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((200, 133)).save(copy)
    query = EXAMPLES / "retrieval" / "query.py"
    args = [str(index), str(photo_folder / "coffee.jpg"), str(copy), "-k", "3"]
    done = _run(query, *args, "--json", "--target", small_server.target)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [len(a["matches"]) for a in answers] == [3, 3]
    (first_id, first_score), *rest = answers[0]["matches"]
    assert first_id == "coffee.jpg" and first_score > 0.999  # itself, first
    assert all(score < first_score - 0.05 for _, score in rest)
    assert answers[1]["matches"][0][0] == "chelsea.jpg"
    scores = [s for _, s in answers[1]["matches"]]
    assert scores == sorted(scores, reverse=True)

    # the human-readable form: ranks, scores, ids
    done = _run(
        query,
        str(index),
        str(photo_folder / "more" / "grace_hopper.png"),
        "-k",
        "2",
        "--target",
        small_server.target,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("query ")
    assert re.match(r"\s+1\.\s+1\.0000\s+more/grace_hopper\.png", lines[1]), lines


# Quality floors per row of the quick set: (recall@1, µAP). 8 images are indexed (4 references,
# 4 distractor tiles) and 20 edited copies queried (4 per edit), so a descriptor that ignores
# the image scores about 1/8 on both, and one query is 0.05 of recall@1. Measured (CPU, torch
# 2.x; the run is deterministic): phash 0.512 / 0.530; avg, gem, rmac 1.000 recall, 0.948 to
# 0.963 µAP; whitened 0.800 to 0.950 recall, 0.832 to 0.937 µAP (the heads are fitted on 26
# tiles of two other photos: at most 25 axes). The floors leave two queries of slack on each
# row while any real breakage (a pool that stops describing the image, a whitening that
# scrambles it) falls far below them.
FLOORS = {
    "phash": (0.4, 0.4),
    "avg": (0.9, 0.85),
    "gem": (0.9, 0.85),
    "rmac": (0.9, 0.85),
    "avg + whiten": (0.7, 0.75),
    "gem + whiten": (0.7, 0.75),
    "rmac + whiten": (0.7, 0.75),
}
ROWS = ("phash", "avg", "avg + whiten", "gem", "gem + whiten", "rmac", "rmac + whiten")
EDITS = ("crop", "jpeg", "flip", "text", "canvas")


def test_copy_detection_quick(tmp_path: Path) -> None:
    """Starts its own server twice (the second with the fitted whitening heads registered)."""
    out = tmp_path / "results.json"
    done = _run(EXAMPLES / "copy_detection" / "run.py", "--quick", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "4 references + 4 distractors indexed; 20 edited copies + 1 negative" in text
    table = {}
    for line in text.splitlines():
        m = re.match(r"\| (\w[\w +]*?)(?: \(.*\))? \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", line)
        if m:
            table[m.group(1)] = (int(m.group(2)), float(m.group(3)), float(m.group(4)))
    assert tuple(table) == ROWS, text
    for _dim, recall, ap in table.values():
        assert 0.0 <= recall <= 1.0 and 0.0 <= ap <= 1.0
    assert table["phash"][0] == 64
    assert table["avg"][0] == table["gem"][0] == table["rmac"][0] == 1280
    # the heads were fitted on 26 tiles: at most 25 components
    assert 1 <= table["avg + whiten"][0] <= 25
    assert table["avg + whiten"][0] == table["gem + whiten"][0] == table["rmac + whiten"][0]
    for method, (recall_floor, ap_floor) in FLOORS.items():
        _dim, recall, ap = table[method]
        assert recall >= recall_floor and ap >= ap_floor, (method, recall, ap, text)
    for method in ("avg", "gem", "rmac"):  # CNN descriptors survive what defeats the hash
        assert table[method][1] >= table["phash"][1] + 0.3, (method, text)
        assert table[method][2] >= table["phash"][2] + 0.3, (method, text)
    results = json.loads(out.read_text())
    assert [r["method"] for r in results["rows"]] == list(ROWS)
    for row in results["rows"]:  # the JSON holds the printed numbers, unrounded
        dim, recall, ap = table[row["method"]]
        assert row["dim"] == dim, row
        assert abs(row["recall1"] - recall) <= 5e-4 and abs(row["micro_ap"] - ap) <= 5e-4, row
        assert tuple(row["per_edit"]) == EDITS, row
        if row["method"] in ("avg", "gem", "rmac"):
            # every edit, flips and pasted copies included: at most one miss of four
            assert min(row["per_edit"].values()) >= 0.75, row
    # recall@1 is the mean over the 20 copies of the per-edit recalls (4 copies each)
    for row in results["rows"]:
        assert abs(np.mean(list(row["per_edit"].values())) - row["recall1"]) < 1e-9, row
    # whitening ran on the server with the heads the script registered, and equals the
    # client's numpy formula on the same descriptors
    assert "whitening server-side" in results["where"]
    assert results["whitening_consistency"] < 1e-4
