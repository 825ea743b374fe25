"""bench/index_scale.py, the scale test of a bulk extract (docs/BENCHMARKS.md, "Indexing at
scale"), run small: its fake server answers, the CLI's peak RSS and bytes written are read, and
a run killed with SIGKILL at a random point then resumed equals an uninterrupted one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_scale_harness_small() -> None:
    done = subprocess.run(
        [sys.executable, "bench/index_scale.py", "--items", "3000", "--kill-items", "3000",
         "--dim", "256", "--shard-rows", "500"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 3,000 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert re.fullmatch(r"\d+ MiB", cells[3])  # the CLI's peak RSS
    # bytes written against the final size (each shard and the manifest are written once)
    assert 0.9 <= float(cells[6]) <= 1.3, row
    assert "equal to the uninterrupted run" in done.stdout, done.stdout
    kept = re.search(r"with ([\d,]+) rows in finished shards", done.stdout)
    assert kept and int(kept.group(1).replace(",", "")) % 500 == 0  # whole shards only
