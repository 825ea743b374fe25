"""The side-by-side benchmark's command line: parse the flags into a RunConfig, run each phase
in turn, then print the target verdicts and write the report."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.config import (
    DEFAULT_MODELS,
    MIXED_CLIENTS,
    SYSTEMS,
    VARIANTS,
    LayertapOptions,
    RunConfig,
    timing_for,
)
from bench.inputs import parse_model, photos
from bench.machine import loadavg, machine_line
from bench.node_sets import phase_memory, phase_mixed
from bench.report import kept_analysis, render
from bench.results import Report, log, report_dict
from bench.systems import phase_inprocess, phase_layertap, phase_litserve, phase_naive
from bench.targets import evaluate


def _ints(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(c) for c in text.split(",")) if text else None


def _pair(text: str) -> tuple[str, str]:
    key, value = text.split("=", 1)
    return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="layertap vs in-process, a naive gRPC server and LitServe "
        "(bench/compare.py's docstring says what is measured)."
    )
    p.add_argument("--out", help="write the Markdown report here (default: print it)")
    p.add_argument("--json", help="also write the run's figures here as JSON (every point)")
    p.add_argument("--quick", action="store_true", help="short smoke run (noisy figures)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (all systems)")
    p.add_argument(
        "--models",
        help="arch:node,... torchvision names (default: mobilenet_v2:features.18,resnet50:layer4; "
        "--quick: mobilenet_v2 only)",
    )
    p.add_argument(
        "--aux-model", default="resnet50:layer4", help="model of the memory and mixed phases"
    )
    p.add_argument("--systems", default=",".join(SYSTEMS), help="subset of " + ",".join(SYSTEMS))
    p.add_argument("--concurrency", help="comma list of in-flight requests (e.g. 1,4,16,64)")
    p.add_argument("--batch-sizes", help="in-process batch sweep, comma list")
    p.add_argument("--seconds", type=float, help="measured seconds per point")
    p.add_argument("--warmup", type=float, help="warm-up seconds per point")
    p.add_argument("--node-sets", type=int, help="node sets of the memory phase (20)")
    p.add_argument("--naive-threads", type=int, default=8, help="naive server's threads")
    p.add_argument(
        "--mixed-inflight", type=int, default=4, help="requests in flight per mixed client"
    )
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-mixed", action="store_true")
    p.add_argument(
        "--inprocess-variants",
        default=",".join(VARIANTS),
        help="in-process pipelines to measure; the fastest is the targets' baseline "
        f"(default: all of {','.join(VARIANTS)})",
    )
    p.add_argument(
        "--layertap-arg",
        action="append",
        default=[],
        help="extra `layertap serve` flag, repeatable (e.g. --layertap-arg=--max-wait-ms=5)",
    )
    p.add_argument(
        "--layertap-env",
        action="append",
        default=[],
        help="KEY=VALUE environment for layertap servers, repeatable (e.g. MALLOC_ARENA_MAX=2)",
    )
    p.add_argument(
        "--layertap-model-key",
        action="append",
        default=[],
        help="KEY=TOML added to every layertap [[models]] entry, repeatable "
        "(e.g. channels_last=true)",
    )
    return p


def _variants(text: str) -> tuple[str, ...]:
    chosen = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        raise SystemExit(f"--inprocess-variants {text!r}: choose from {','.join(VARIANTS)}")
    return chosen


def config_from(args: argparse.Namespace, argv: Sequence[str]) -> RunConfig:
    """The run's settings from parsed flags; unknown systems and a missing LitServe stop the
    run before anything is measured."""
    systems = frozenset(args.systems.split(",")) - {"none", ""}
    unknown = systems - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown --systems {sorted(unknown)}; known: {SYSTEMS}")
    if "litserve" in systems and importlib.util.find_spec("litserve") is None:
        raise SystemExit(
            "LitServe is not installed: .venv/bin/pip install -e '.[bench]' "
            "(or leave it out with --systems inprocess,layertap,naive)"
        )
    models = args.models or ",".join(DEFAULT_MODELS[:1] if args.quick else DEFAULT_MODELS)
    timing = timing_for(
        args.quick, args.seconds, args.warmup, _ints(args.concurrency), _ints(args.batch_sizes),
        args.node_sets,
    )  # fmt: skip
    layertap = LayertapOptions(
        tuple(args.layertap_arg),
        tuple(_pair(kv) for kv in args.layertap_env),
        tuple(args.layertap_model_key),
    )
    return RunConfig(
        timing=timing, quick=args.quick, argv=tuple(argv), device=args.device,
        models=tuple(models.split(",")), aux_model=args.aux_model, systems=systems,
        naive_threads=args.naive_threads, mixed_inflight=args.mixed_inflight,
        skip_memory=args.skip_memory, skip_mixed=args.skip_mixed, layertap=layertap, out=args.out,
        inprocess_variants=_variants(args.inprocess_variants),
        json_out=args.json,
    )  # fmt: skip


async def run(cfg: RunConfig) -> int:
    report = Report(
        cfg, cfg.mode, datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"), loadavg()
    )
    report.models = [parse_model(m) for m in cfg.models]
    jpegs = [data for _, data in photos()]
    log(f"{len(jpegs)} JPEG photos, {sum(map(len, jpegs)) // 1024} KiB; machine: "
        f"{machine_line(cfg.device)}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="layertap-bench-") as tmp:
        logdir = Path(tmp)
        for spec in report.models:
            log(f"{spec.arch} ({spec.node}, {spec.weights_label})")
            if "inprocess" in cfg.systems:
                phase_inprocess(report, spec, jpegs)
            if "layertap" in cfg.systems:
                await phase_layertap(report, spec, jpegs, logdir)
            if "naive" in cfg.systems:
                await phase_naive(report, spec, jpegs, logdir)
            if "litserve" in cfg.systems:
                await phase_litserve(report, spec, jpegs, logdir)
        if not cfg.skip_memory or not cfg.skip_mixed:
            aux = parse_model(cfg.aux_model, allow_weights=False)
            if not cfg.skip_memory:
                log(f"memory: {aux.arch}, {cfg.timing.node_sets} node sets")
                await phase_memory(report, aux, jpegs, logdir)
            if not cfg.skip_mixed:
                log(f"mixed traffic: {aux.arch}, {MIXED_CLIENTS} clients")
                await phase_mixed(report, aux, jpegs, logdir)
    report.load_end = loadavg()
    targets = evaluate(report)
    text = render(report, targets)
    if cfg.out:
        out = Path(cfg.out)
        kept = kept_analysis(out.read_text() if out.is_file() else "")
        out.write_text(text + "\n" + (f"\n{kept}\n" if kept else ""))
        log(f"wrote {cfg.out}")
    else:
        print(text)
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(report_dict(report, targets), indent=1))
        log(f"wrote {cfg.json_out}")
    print()
    for t in targets:
        print(f"TARGET {t.verdict}: {t.model}: {t.what}: {t.measured} (required {t.required})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return asyncio.run(run(config_from(parser().parse_args(argv), argv)))
