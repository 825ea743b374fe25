"""The side-by-side benchmark's harness (the bench package behind bench/compare.py): load
generator, target verdicts and an end-to-end quick run of the pieces that need no extra packages
(in-process, layertap, the naive gRPC server) on a small model, about 20 s. These check the
harness, never the figures."""

from __future__ import annotations

import asyncio

from bench import cli, loadgen, metrics, targets
from bench.config import RunConfig
from bench.inputs import ModelSpec
from bench.results import Point, Report


def test_closed_loop_counts_only_the_measured_window():
    async def go():
        def make(_k):
            async def call(_i):
                await asyncio.sleep(0.01)
                return {"x": 1.0}

            return call

        return await loadgen.closed_loop(make, 4, warmup=0.1, seconds=0.3)

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

        return await loadgen.closed_loop(make, 1, warmup=0.0, seconds=0.3)

    result = asyncio.run(go())
    assert result.errors > 0 and "boom" in result.first_error


def test_metrics_read_prometheus_text_by_sample_name_and_labels():
    text = (
        "# TYPE layertap_stage_duration_seconds histogram\n"
        'layertap_stage_duration_seconds_bucket{stage="queue",le="0.1"} 2\n'
        'layertap_stage_duration_seconds_count{stage="queue"} 4\n'
        'layertap_stage_duration_seconds_sum{stage="queue"} 0.2\n'
        "# TYPE layertap_batch_size histogram\n"
        'layertap_batch_size_count{model="m",device="cpu"} 2\n'
        'layertap_batch_size_sum{model="m",device="cpu"} 8\n'
    )
    after = metrics.parse(text)
    assert metrics.metric(after, "layertap_stage_duration_seconds_count", stage="queue") == 4
    # labels not asked for (device) do not hide a sample; a series not exposed reads 0
    assert metrics.metric(after, "layertap_batch_size_sum", model="m") == 8
    assert metrics.metric(after, "layertap_batch_size_sum", model="other") == 0
    stages = metrics.stage_breakdown([], after, "m")
    assert stages["queue_ms"] == 50 and stages["mean_batch"] == 4 and stages["forwards"] == 2


def _point(system, model, c, rate, p50, p99, config=""):
    return Point(system, model, c, rate, p50, p99, p50, 100, 0, config=config)


def _report(layertap_rate: float) -> object:
    report = Report(RunConfig(device="cpu"), "quick", "now", "0 0 0")
    report.models = [ModelSpec("m", "n", None)]
    report.variants["m"] = {"eager": [_point("in-process", "m", 0, 100.0, 0, 0, "batch 8")]}
    report.batch1_variants["m"] = {"eager": _point("in-process", "m", 1, 50.0, 20.0, 25.0)}
    for c in (1, 4, 16):
        report.points.append(_point("layertap", "m", c, layertap_rate, 22.0, 40.0))
        report.points.append(_point("naive gRPC", "m", c, 50.0, 30.0, 90.0))
        report.points.append(_point("LitServe", "m", c, 90.0, 25.0, 80.0))
    report.memory = {"model": "m", "sets": [["a"]] * 20, "ratio": 1.05}
    report.memory.update(one={"rss": 100}, twenty={"rss": 105})
    return report


def test_targets_pass_and_fail_honestly():
    passing = {t.what: t.verdict for t in targets.evaluate(_report(layertap_rate=96.0))}
    assert set(passing.values()) == {"PASS"}, passing
    failing = {t.what: t.verdict for t in targets.evaluate(_report(layertap_rate=80.0))}
    assert failing["throughput c=4 ≥ LitServe"] == "FAIL"
    assert failing["throughput c=16 ≥ 0.9× fastest in-process"] == "FAIL"
    assert failing["p50 c=1 ≤ LitServe"] == "PASS"


def test_the_baseline_is_the_fastest_in_process_variant():
    report = _report(layertap_rate=96.0)  # 0.96x eager's 100 images/s
    assert {t.what: t.verdict for t in targets.evaluate(report)}[
        "throughput c=16 ≥ 0.9× fastest in-process"
    ] == "PASS"
    report.variants["m"]["compiled"] = [
        _point("in-process", "m", 0, 90.0, 0, 0, "compiled, batch 1"),
        _point("in-process", "m", 0, 120.0, 0, 0, "compiled, batch 4"),
    ]
    report.batch1_variants["m"]["compiled"] = _point("in-process", "m", 1, 60.0, 16.0, 20.0)
    verdicts = {t.what: t for t in targets.evaluate(report)}
    throughput = verdicts["throughput c=16 ≥ 0.9× fastest in-process"]
    assert throughput.verdict == "FAIL" and "compiled, batch 4" in throughput.measured
    latency = verdicts["p50 c=1 ≤ fastest in-process batch 1 + 2 ms"]
    assert latency.verdict == "FAIL" and "22.0 vs 16.0 ms" in latency.measured  # +6 ms


def test_unmeasured_targets_are_skipped():
    report = _report(96.0)
    report.points = [p for p in report.points if p.system != "LitServe"]
    verdicts = {t.what: t.verdict for t in targets.evaluate(report)}
    assert verdicts["throughput c=4 ≥ LitServe"] == "SKIP"
    assert verdicts["p99 c=16 below naive and LitServe"] == "SKIP"
    assert verdicts["throughput c=16 ≥ 0.9× fastest in-process"] == "PASS"


def test_quick_run_writes_the_expected_tables(tmp_path, capsys):
    out = tmp_path / "BENCH.md"
    code = cli.main(
        [
            "--quick",
            "--models", "mobilenet_v3_small:features.12",
            "--systems", "inprocess,layertap,v2,naive",
            "--concurrency", "1,2",
            "--batch-sizes", "1,2",
            "--inprocess-variants", "eager,compiled",
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
        "in-process, eager (best batch)/–",
        "in-process, eager, batch-1 latency/1",
        "layertap/1",
        "layertap/2",
        "layertap v2 gRPC/1",
        "layertap v2 gRPC/2",
        "layertap v2 HTTP/1",
        "layertap v2 HTTP/2",
        "naive gRPC/1",
        "naive gRPC/2",
    ):
        assert expected in firsts, (expected, firsts)
    assert "mobilenet_v3_small (`features.12`): throughput" in text
    assert "mean batch" in text  # layertap's stage breakdown from its Prometheus metrics
    printed = capsys.readouterr().out
    verdicts = [line for line in printed.splitlines() if line.startswith("TARGET ")]
    assert len(verdicts) == 7
    compiled = [r for r in rows if r.startswith("| in-process, compiled (best batch)")]
    assert len(compiled) == 1 and "compiled in" in compiled[0], rows
    # LitServe and memory were not run: those targets say so instead of passing
    assert any(v.startswith("TARGET SKIP") and "LitServe" in v for v in verdicts)
    assert all(v.split()[1].rstrip(":") in ("PASS", "FAIL", "SKIP") for v in verdicts)
