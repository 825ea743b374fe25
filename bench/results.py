"""What a benchmark run measured: one point per (system, model, concurrency), and the report
that collects every phase's points for the targets and the Markdown."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bench.config import RunConfig
from bench.inputs import ModelSpec


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def fmt(value: float | None, digits: int = 1) -> str:
    """A figure for the tables; – for one not measured."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def log(message: str) -> None:
    """Progress on stderr, so that a report printed to stdout stays clean."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Point:
    """One (system, model, concurrency) measurement."""

    system: str
    model: str
    concurrency: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    completed: int
    errors: int
    server_cpu_ms: float = float("nan")  # server CPU per completed image
    client_cpu_ms: float = float("nan")  # this process's CPU per completed image
    config: str = ""
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    config: RunConfig
    mode: str
    started: str
    load_start: str
    models: list[ModelSpec] = field(default_factory=list)
    # per model, per in-process variant (config.VARIANTS): its batch sweep and batch-1 latency
    variants: dict[str, dict[str, list[Point]]] = field(default_factory=dict)
    batch1_variants: dict[str, dict[str, Point]] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    litserve_sweep: dict[str, list[Point]] = field(default_factory=dict)
    litserve_best: dict[str, str] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    mixed: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_end: str = ""

    def fastest(self, model: str) -> Point | None:
        """The baseline: the fastest in-process point, over every variant and batch size."""
        points = [p for sweep in self.variants.get(model, {}).values() for p in sweep]
        return max(points, key=lambda p: p.images_per_s) if points else None

    def fastest_batch1(self, model: str) -> Point | None:
        """The lowest in-process batch-1 p50 over the variants."""
        points = list(self.batch1_variants.get(model, {}).values())
        return min(points, key=lambda p: p.p50_ms) if points else None

    def get(self, system: str, model: str, concurrency: int) -> Point | None:
        for p in self.points:
            if p.system == system and p.model == model and p.concurrency == concurrency:
                return p
        return None


def _finite(value: Any) -> Any:
    """JSON has no NaN: a figure not measured becomes null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def report_dict(report: Report, targets: Sequence[Any] = ()) -> dict[str, Any]:
    """A run's figures as plain JSON data (`--json`): its settings, every point (the in-process
    sweeps and batch-1 rows too) and the target verdicts; figures not measured are null."""
    cfg = report.config
    return _finite(
        {
            "started_utc": report.started,
            "argv": list(cfg.argv),
            "device": cfg.device,
            "mode": report.mode,
            "timing": asdict(cfg.timing),
            "layertap": asdict(cfg.layertap),
            "load": [report.load_start, report.load_end],
            "models": [asdict(m) | {"weights_label": m.weights_label} for m in report.models],
            "points": [asdict(p) for p in report.points],
            # every variant's sweep in one list (each point's config names its variant), and
            # the fastest batch-1 latency; per variant below
            "inprocess": {
                m: [asdict(p) for ps in vs.values() for p in ps]
                for m, vs in report.variants.items()
            },
            "batch1": {
                m: asdict(b1) for m in report.batch1_variants if (b1 := report.fastest_batch1(m))
            },
            "batch1_variants": {
                m: {v: asdict(p) for v, p in vs.items()} for m, vs in report.batch1_variants.items()
            },
            "notes": list(report.notes),
            "targets": [asdict(t) | {"verdict": t.verdict} for t in targets],
        }
    )
