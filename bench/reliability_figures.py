"""The figures of docs/RELIABILITY.md: soak, overload, fairness, the memory estimate, fault
outcomes and the bad-input corpus.

Run: `.venv/bin/python bench/reliability_figures.py` (about 5 minutes on 2 cores). Options:
`--soak-s 60 --warmup-s 10 --concurrency 64` (the soak); `--overload-windows 2` (5 s windows
after a 4 s ramp); `--queue-ab` (also the overload at max_queue_images 16 and at 512, about
30 s more); `--fairness-s 10` (each fairness window);
`--skip soak,overload,fairness,memory,faults,corpus`; `--json out.json` (every number).

The scenarios are the very functions the tests run (`tests/reliability/test_soak.py`:
`run_soak`, `run_overload`; `test_fairness.py`: `run_fairness`; `test_memory_budget.py`:
`measure_estimates`); the fault outcomes come from running
`tests/reliability/test_faults.py` under pytest and reading what each test recorded
(`record_property("outcome", ...)` in its JUnit XML); the corpus is
`tests/reliability/test_bad_inputs.py`'s `run_corpus` against its `corpus_settings()` server.
Everything is on 127.0.0.1; nothing is written outside a temporary directory (and --json).
Prints Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "reliability")]


def machine() -> str:
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {gpu}; Python "
        f"{platform.python_version()}, torch {torch.__version__}; load average at start {load}; "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )


def _statuses(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in summary["statuses"].items())


def soak_table(figures: dict[str, Any]) -> str:
    s = figures["soak"]
    rows = [
        ("concurrency", figures["concurrency"]),
        ("warm-up (not measured)", f"{figures['warmup']['seconds']} s, "
                                   f"{figures['warmup']['requests']} requests"),
        ("measured", f"{s['seconds']} s"),
        ("requests", s["requests"]),
        ("statuses (kind:code count)", _statuses(s)),
        ("unexpected statuses or wrong shapes", s["unexpected"]),
        ("images extracted (OK)", s["images_ok"]),
        ("requests/s", s["req_per_s"]),
        ("latency of OK requests p50 / p99 / max", f"{s['ok_p50_ms']} / {s['ok_p99_ms']} / "
                                                    f"{s['ok_max_ms']} ms"),
        ("server RSS, median of first → last third", f"{figures['rss_before_mib']} → "
                                            f"{figures['rss_after_mib']} MiB "
                                            f"({figures['rss_growth_pct']:+.2f} %)"),
        ("server RSS max while measured", f"{s['rss_max_mib']} MiB"),
        ("server's Extract counters == client's", figures["server_counts"]
         == figures["client_counts"]),
        ("exit code after SIGTERM", figures["exit_code"]),
    ]  # fmt: skip
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def overload_table(figures: dict[str, Any]) -> str:
    lines = [
        f"max_queue_images = {figures['max_queue_images']}, {figures['concurrency']} clients\n",
        "| phase | s | requests | statuses | images/s | OK p50 / p99 (ms) "
        "| refused p50 / p99 (ms) | unknown-node refusal p50 / p99 (ms) | RSS median / max (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in figures["phases"]:
        lines.append(
            f"| {p['phase']} | {p['seconds']} | {p['requests']} | {_statuses(p)} | "
            f"{p['images_ok'] / p['seconds']:.0f} | {p['ok_p50_ms']} / {p['ok_p99_ms']} | "
            f"{p['refused_p50_ms']} / {p['refused_p99_ms']} | "
            f"{p['predecode_refusal_p50_ms']} / {p['predecode_refusal_p99_ms']} | "
            f"{p['rss_median_mib']} / {p['rss_max_mib']} |"
        )
    return "\n".join(lines)


def fault_outcomes(scratch: Path) -> tuple[str, list[dict[str, str]]]:
    """Run test_faults.py under pytest; one row per test: result and what it observed."""
    junit = scratch / "faults.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "reliability" / "test_faults.py"), f"--junitxml={junit}",
         "-o", "junit_family=xunit1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        result = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                xfail = tag == "skipped" and node.get("type") == "pytest.xfail"
                result = f"{'xfail' if xfail else tag}: {node.get('message', '')[:200]}"
        props = {p.get("name"): p.get("value", "") for p in case.iter("property")}
        rows.append(
            {
                "test": case.get("name", ""),
                "seconds": case.get("time", ""),
                "result": result,
                "outcome": props.get("outcome", ""),
            }
        )
    lines = ["| test | result | s | observed |", "|---|---|---|---|"]
    for r in rows:
        observed = r["outcome"].replace("|", "\\|")
        lines.append(f"| `{r['test']}` | {r['result']} | {float(r['seconds']):.2f} | {observed} |")
    return f"pytest: {summary}\n\n" + "\n".join(lines), rows


def corpus_table(scratch: Path) -> tuple[str, list[dict[str, Any]]]:
    try:
        import test_bad_inputs as corpus
    except ImportError as exc:
        return f"(tests/reliability/test_bad_inputs.py not importable: {exc})", []
    if not all(hasattr(corpus, n) for n in ("corpus_settings", "run_corpus")):
        return "(test_bad_inputs.py has no corpus_settings()/run_corpus())", []
    from conftest import start_server

    running = start_server(corpus.corpus_settings())
    try:
        rows = corpus.run_corpus(running.target, scratch)
    finally:
        running.stop()
    plain = [
        {k: getattr(r, k, None) for k in ("case", "expected", "status", "details", "after_ok")}
        for r in rows
    ]
    if hasattr(corpus, "markdown"):
        return corpus.markdown(rows), plain
    lines = ["| case | expected | status |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['expected']} | {r['status']} |" for r in plain]
    return "\n".join(lines), plain


def fairness_figures(scratch: Path, seconds: float) -> list[dict[str, Any]]:
    """tests/reliability/test_fairness.py's scenario: a flooder at concurrency 256 (retrying at
    once, then politely after 0.5 s) against a client at concurrency 4."""
    import test_fairness
    import test_soak

    figures = []
    with test_soak.serving(scratch / "fairness", test_fairness.CONFIG) as server:
        for backoff in (0.0, 0.5):
            row = test_fairness.run_fairness(
                server.target, "r18", seconds=seconds, flood_backoff_s=backoff
            )
            figures.append({"flood_backoff_s": backoff, **row})
    return figures


def fairness_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| flooder retries after | victim p50 alone (ms) | victim p50 beside the flood (ms) | "
        "ratio | victim OK/s | flooder OK/s | flooder refused |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        victim = r["victim_flooded"]
        lines.append(
            f"| {r['flood_backoff_s']} s | {r['victim_solo']['p50_ms']} | {victim['p50_ms']} | "
            f"{r.get('victim_p50_ratio')} | {victim['codes'].get('OK', 0) / r['seconds']:.1f} | "
            f"{r['flooder']['ok_per_s']} | {r['flooder']['codes'].get('RESOURCE_EXHAUSTED', 0)} |"
        )
    return "\n".join(lines)


def memory_rows(scratch: Path) -> list[dict[str, Any]]:
    """tests/reliability/test_memory_budget.py's measurement: the estimate against the growth of
    the server's peak RSS, native inputs of growing size."""
    import test_memory_budget as t

    rows = []
    for arch, nodes, raw in (
        ("mobilenet_v2", ("features.18",), False),
        ("resnet18", ("layer3", "layer4"), True),
        ("resnet50", ("layer4",), False),
    ):
        folder = scratch / f"memory-{arch}"
        folder.mkdir()
        rows += t.measure_estimates(folder, arch, nodes, (1024, 2048, 3072), raw)
    return rows


def memory_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | nodes, pooling | side (px) | estimate (MiB) | measured (MiB) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['nodes']}, {r['pool']} | {r['side']} | {r['estimate_mib']} | "
            f"{r['measured_mib']} | {r['ratio']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak-s", type=float, default=60)
    parser.add_argument("--warmup-s", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--overload-windows", type=int, default=2)
    parser.add_argument(
        "--queue-ab",
        action="store_true",
        help="also run the overload with max_queue_images 16 and 512 (one 6 s window each)",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated: soak,overload,faults,corpus,fairness,memory",
    )
    parser.add_argument("--fairness-s", type=float, default=10, help="each fairness window")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    import test_soak

    out: dict[str, Any] = {"machine": machine()}
    print(f"machine: {out['machine']}\n")
    with tempfile.TemporaryDirectory(prefix="layertap-reliability-") as tmp:
        scratch = Path(tmp)
        if "soak" not in skip:
            figures = test_soak.run_soak(
                scratch, warmup_s=args.warmup_s, duration_s=args.soak_s,
                concurrency=args.concurrency,
            )  # fmt: skip
            out["soak"] = figures
            print("## Soak\n\n" + soak_table(figures) + "\n")
            if figures["unexpected_examples"]:
                print("unexpected:", *figures["unexpected_examples"], sep="\n- ")
        if "overload" not in skip:
            figures = test_soak.run_overload(scratch, windows=args.overload_windows)
            out["overload"] = figures
            print("## Overload\n\n" + overload_table(figures) + "\n")
        if args.queue_ab:
            out["queue_ab"] = []
            for queue in (16, 512):
                figures = test_soak.run_overload(
                    scratch, windows=1, window_s=6, ramp_s=2, recovery_s=1,
                    max_queue_images=queue,
                )  # fmt: skip
                out["queue_ab"].append(figures)
                print(f"## Overload A/B, queue {queue}\n\n" + overload_table(figures) + "\n")
        if "fairness" not in skip:
            out["fairness"] = fairness_figures(scratch, args.fairness_s)
            print("## Fairness\n\n" + fairness_table(out["fairness"]) + "\n")
        if "memory" not in skip:
            out["memory"] = memory_rows(scratch)
            print("## Memory estimate\n\n" + memory_table(out["memory"]) + "\n")
        if "faults" not in skip:
            table, rows = fault_outcomes(scratch)
            out["faults"] = rows
            print("## Faults\n\n" + table + "\n")
        if "corpus" not in skip:
            table, corpus_rows = corpus_table(scratch)
            out["corpus"] = corpus_rows
            print("## Bad-input corpus\n\n" + table + "\n")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
