"""bench/gpu_check.sh, the one-lease GPU check (issue 18), proved on the CPU: its dry run runs
every step (environment, `pytest -m gpu`, the benchmark runs, the report) with this venv, and
the report has its tables and no problem; a run that cannot happen is reported as a problem
and the exit code says so. The renderer's verdicts and problems are checked on made-up files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
DOC = ROOT / "docs" / "BENCHMARKS_GPU.md"


def _dry_run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    work, out = tmp_path / "work", tmp_path / "out"
    full_env = {**os.environ, "GPU_CHECK_WORK": str(work), "OUT": str(out), **env}
    full_env["PYTHON"] = sys.executable  # this venv, whichever way pytest was started
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=full_env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    return done, work


@pytest.mark.slow
def test_dry_run_writes_the_report_with_its_tables(tmp_path: Path) -> None:
    doc_before = DOC.read_text()
    done, work = _dry_run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert DOC.read_text() == doc_before  # the dry run never writes over the real report
    text = (work / "BENCHMARKS_GPU.md").read_text()
    assert text.startswith(doc_before[: doc_before.index(gpu_report.MARKER)])  # How to run kept
    for heading in (
        "## Run of ",
        "### Target: layertap ≥ 3× the naive server at 2 in flight",
        "### Tests: `pytest -m gpu tests/test_gpu.py`",
        "### mobilenet_v2: images/s at each number in flight",
        "### Commands",
        "### Problems",
    ):
        assert heading in text, heading
    assert "None: every step ran, no request failed." in text
    assert "Traceback" not in text and "Not yet measured" not in text
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| ")]  # fmt: skip
    target = [r for r in rows if r[0] == "mobilenet_v2"]
    assert len(target) == 1 and target[0][6] in ("**PASS**", "**FAIL**"), target
    points = {(r[0], r[1], r[2]) for r in rows if len(r) == 10}
    for expected in (
        ("layertap", "fp32, defaults", "1"),
        ("layertap", "fp32, defaults", "2"),
        ("layertap", "bf16 autocast, gpu_decode off", "2"),
        ("naive gRPC", "8 threads", "2"),
    ):
        assert expected in points, (expected, points)
    inprocess = {r[1].split(",")[0] for r in rows if len(r) == 10 and r[0] == "in-process"}
    assert inprocess == {"eager", "folded"}, inprocess
    assert all(r[6] == "0" for r in rows if len(r) == 10 and r[0] != "system")  # no errors
    figures = json.loads((work / "gpu_figures.json").read_text())
    assert [r["rc"] for r in figures["runs"]] == ["0", "0"] and figures["problems"] == []
    assert figures["tests"]["rc"] == "0" and sum(figures["tests"]["counts"].values()) >= 5
    assert figures["env"]["layertap_from"] == str(work / "site" / "layertap" / "server")
    returned = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert returned == sorted(["BENCHMARKS_GPU.md", "gpu_figures.json", "pytest.log",
                               "bench.log", "gpu_check.log", "env.json"])  # fmt: skip


@pytest.mark.slow
def test_a_run_that_cannot_happen_fails_the_check(tmp_path: Path) -> None:
    """No time left for the benchmark: both runs are reported skipped and the exit code is 1."""
    done, work = _dry_run(tmp_path, GPU_CHECK_BUDGET_S="0")
    assert done.returncode == 1, done.stderr[-3000:]
    text = (work / "BENCHMARKS_GPU.md").read_text()
    assert "skipped: time budget" in text and "Not measured: no benchmark run finished" in text
    assert "None: every step ran" not in text


def _write_run(work: Path, name: str, points: list[dict], models=("m",)) -> None:
    data = {
        "timing": {"concurrency": [1, 64], "batch_sizes": [1], "warmup": 1, "seconds": 3},
        "models": [{"arch": m} for m in models],
        "points": points, "inprocess": {}, "batch1": {},
    }  # fmt: skip
    (work / name).write_text(json.dumps(data))


def _p(system: str, c: int, rate: float, errors: int = 0) -> dict:
    return {"system": system, "model": "m", "concurrency": c, "images_per_s": rate,
            "p50_ms": 1.0, "p99_ms": 2.0, "errors": errors, "completed": int(rate) * 3,
            "server_cpu_ms": None,
            "config": "8 threads" if system != "layertap" else "", "extra": {}}  # fmt: skip


def test_renderer_judges_the_target_and_lists_every_problem(tmp_path: Path) -> None:
    (tmp_path / "env.json").write_text(json.dumps({"problems": [], "date_utc": "now"}))
    (tmp_path / "problems.txt").write_text("pip install of .whl/ failed\n")
    (tmp_path / "pytest.rc").write_text("1\n")
    (tmp_path / "pytest.xml").write_text(
        '<testsuites><testsuite><testcase name="test_ok" time="1.0"/>'
        '<testcase name="test_bad" time="2.0"><failure message="boom"/></testcase>'
        '<testcase name="test_cuda" time="0"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    _write_run(tmp_path, "run-1.json", [_p("layertap", 64, 310.0), _p("naive gRPC", 64, 100.0)])
    _write_run(tmp_path, "run-2.json", [_p("layertap", 64, 250.0, errors=3), _p("layertap", 1, 0)])
    (tmp_path / "variants.tsv").write_text(
        "fp32\t0\t10\trun-1.json\tcmd one\n"
        "fp16\t0\t10\trun-2.json\tcmd two\n"
        "both\tskipped: time budget (5s left)\t0\trun-3.json\tcmd three\n"
    )
    text, figures, problems = gpu_report.render(tmp_path, DOC, dry_run=False)
    (target,) = figures["targets"]
    assert (target["verdict"], round(target["ratio"], 2)) == ("PASS", 3.1)
    assert "| m | fp32 | 310.0 | 100.0 | 3.10× | ≥ 3× | **PASS** | fp32 (310.0) |" in text
    assert "pip install of .whl/ failed" in problems
    assert any("pytest" in p and "exit code 1" in p for p in problems)
    assert "pytest -m gpu: 1 test(s) skipped" in problems  # on the device, a skip is a problem
    assert any("fp16: layertap m c=64: 3 errors" in p for p in problems)
    assert any("fp16: layertap m c=1: no response inside the measured window" in p
               for p in problems)  # fmt: skip
    assert any("'both': skipped: time budget" in p for p in problems)
    assert "| `test_bad` | failed | 2.0 | boom |" in text
    # below the line, the target fails
    _write_run(tmp_path, "run-1.json", [_p("layertap", 64, 290.0), _p("naive gRPC", 64, 100.0)])
    (target,) = gpu_report.render(tmp_path, DOC, dry_run=False)[1]["targets"]
    assert target["verdict"] == "FAIL"
