"""What a benchmark run measured: one point per (system, model, concurrency), and the report
that collects every phase's points for the targets and the Markdown."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    inprocess: dict[str, list[Point]] = field(default_factory=dict)  # batch sweep per model
    batch1: dict[str, Point] = field(default_factory=dict)
    # the same loop with BatchNorms folded as layertap's extractors do (reference rows)
    inprocess_folded: dict[str, list[Point]] = field(default_factory=dict)
    batch1_folded: dict[str, Point] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    litserve_sweep: dict[str, list[Point]] = field(default_factory=dict)
    litserve_best: dict[str, str] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    mixed: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_end: str = ""

    def get(self, system: str, model: str, concurrency: int) -> Point | None:
        for p in self.points:
            if p.system == system and p.model == model and p.concurrency == concurrency:
                return p
        return None
