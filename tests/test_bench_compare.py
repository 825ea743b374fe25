"""The side-by-side benchmark's harness (bench/compare.py): load generator, target verdicts and
an end-to-end quick run of the pieces that need no extra packages (in-process, layertap, the
naive gRPC server) on a small model, about 20 s. These check the harness, never the figures."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_compare():
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


compare = _load_compare()


def test_closed_loop_counts_only_the_measured_window():
    async def go():
        def make(_k):
            async def call(_i):
                await asyncio.sleep(0.01)
                return {"x": 1.0}

            return call

        return await compare.closed_loop(make, 4, warmup=0.1, seconds=0.3)

    result = asyncio.run(go())
    # 4 in flight, ~10 ms each: about 400/s; loose bounds (shared CI machine)
    assert 20 <= len(result.latencies_ms) <= 4 * 0.3 / 0.01 + 4
    assert all(v >= 9 for v in result.latencies_ms)
    assert result.errors == 0 and result.extras[0] == {"x": 1.0}


def test_closed_loop_counts_errors_and_keeps_going():
    async def go():
        def make(_k):
            async def call(i):
                if i % 2:
                    raise RuntimeError("boom")
                await asyncio.sleep(0.005)

            return call

        return await compare.closed_loop(make, 1, warmup=0.0, seconds=0.3)

    result = asyncio.run(go())
    assert result.errors > 0 and "boom" in result.first_error


def _point(system, model, c, rate, p50, p99, config=""):
    return compare.Point(system, model, c, rate, p50, p99, p50, 100, 0, config=config)


def _report(layertap_rate: float) -> object:
    args = argparse.Namespace(device="cpu")
    report = compare.Report(args, "quick", "now", "0 0 0")
    report.models = [compare.ModelSpec("m", "n", None)]
    report.inprocess["m"] = [_point("in-process", "m", 0, 100.0, 0, 0, "batch 8")]
    report.batch1["m"] = _point("in-process", "m", 1, 50.0, 20.0, 25.0)
    for c in (1, 4, 16):
        report.points.append(_point("layertap", "m", c, layertap_rate, 22.0, 40.0))
        report.points.append(_point("naive gRPC", "m", c, 50.0, 30.0, 90.0))
        report.points.append(_point("LitServe", "m", c, 90.0, 25.0, 80.0))
    report.memory = {"model": "m", "sets": [["a"]] * 20, "ratio": 1.05}
    report.memory.update(one={"rss": 100}, twenty={"rss": 105})
    return report


def test_targets_pass_and_fail_honestly():
    passing = {t.what: t.verdict for t in compare.evaluate(_report(layertap_rate=96.0))}
    assert set(passing.values()) == {"PASS"}, passing
    failing = {t.what: t.verdict for t in compare.evaluate(_report(layertap_rate=80.0))}
    assert failing["throughput c=4 ≥ LitServe"] == "FAIL"
    assert failing["throughput c=16 ≥ 0.95× in-process"] == "FAIL"
    assert failing["p50 c=1 ≤ LitServe"] == "PASS"


def test_unmeasured_targets_are_skipped():
    report = _report(96.0)
    report.points = [p for p in report.points if p.system != "LitServe"]
    verdicts = {t.what: t.verdict for t in compare.evaluate(report)}
    assert verdicts["throughput c=4 ≥ LitServe"] == "SKIP"
    assert verdicts["p99 c=16 below naive and LitServe"] == "SKIP"
    assert verdicts["throughput c=4 ≥ 0.95× in-process"] == "PASS"


def test_quick_run_writes_the_expected_tables(tmp_path, capsys):
    out = tmp_path / "BENCH.md"
    code = compare.main(
        [
            "--quick",
            "--models", "mobilenet_v3_small:features.12",
            "--systems", "inprocess,layertap,naive",
            "--concurrency", "1,2",
            "--batch-sizes", "1,2",
            "--seconds", "0.6",
            "--warmup", "0.3",
            "--skip-memory",
            "--skip-mixed",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    text = out.read_text()
    for heading in ("## Targets", "## mobilenet_v3_small (`features.12`)", "## Memory", "## GPU"):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    firsts = [r.split("|")[1].strip() + "/" + r.split("|")[2].strip() for r in rows]
    for expected in (
        "in-process (best batch)/–",
        "in-process batch-1 latency/1",
        "layertap/1",
        "layertap/2",
        "naive gRPC/1",
        "naive gRPC/2",
    ):
        assert expected in firsts, (expected, firsts)
    assert "mobilenet_v3_small (`features.12`): throughput" in text
    assert "mean batch" in text  # layertap's stage breakdown from its Prometheus metrics
    printed = capsys.readouterr().out
    verdicts = [line for line in printed.splitlines() if line.startswith("TARGET ")]
    assert len(verdicts) == 8
    # LitServe and memory were not run: those targets say so instead of passing
    assert any(v.startswith("TARGET SKIP") and "LitServe" in v for v in verdicts)
    assert all(v.split()[1].rstrip(":") in ("PASS", "FAIL", "SKIP") for v in verdicts)
