"""layertap's Prometheus endpoint read by the benchmark: a scrape, one sample's value, and the
per-stage means over a measured window (the difference of two scrapes)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    name: str  # the sample's own name: `…_count`, `…_sum`, `…_total`, as exposed
    labels: dict[str, str]
    value: float


Samples = list[Sample]


def parse(text: str) -> Samples:
    """Prometheus exposition text -> its samples, in the order they were exposed."""
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as r:
        return parse(r.read().decode())


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly `labels`, else the first whose labels include them (a
    histogram's `le`, a label added later), else 0: a series not yet created counts as zero."""
    named = [s for s in samples if s.name == name]
    for s in named:
        if s.labels == labels:
            return s.value
    for s in named:
        if labels.items() <= s.labels.items():
            return s.value
    return 0.0


def stage_breakdown(before: Samples, after: Samples, model: str) -> dict[str, float]:
    """Per-window means of layertap's own histograms."""

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    out: dict[str, float] = {}
    for stage in ("queue", "decode", "compute", "encode"):
        n = delta("layertap_stage_duration_seconds_count", stage=stage)
        s = delta("layertap_stage_duration_seconds_sum", stage=stage)
        out[f"{stage}_ms"] = 1000 * s / n if n else float("nan")
    batches = delta("layertap_batch_size_count", model=model)
    images = delta("layertap_batch_size_sum", model=model)
    out["forwards"] = batches
    out["mean_batch"] = images / batches if batches else float("nan")
    # CPU per image by thread role (server/thread_roles.py): where the server's CPU goes
    roles = {s.labels["role"] for s in after if s.name == "layertap_thread_cpu_seconds_total"}
    for role in sorted(roles):
        cpu = delta("layertap_thread_cpu_seconds_total", role=role)
        out[f"cpu_ms/{role}"] = 1000 * cpu / images if images else float("nan")
    n = delta("layertap_request_duration_seconds_count", method="Extract")
    s = delta("layertap_request_duration_seconds_sum", method="Extract")
    out["server_request_ms"] = 1000 * s / n if n else float("nan")
    return out


async def compiled(url: str, timeout: float = 900.0) -> float:
    """Wait until layertap's background compile thread is idle (`layertap_compiles_pending`
    0: every batch size of every node set served so far runs compiled, where compile = "auto"
    chose it), so no point measures a compile. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        samples = await asyncio.to_thread(scrape, url)
        if metric(samples, "layertap_compiles_pending") == 0:
            break
        await asyncio.sleep(1.0)
    return time.monotonic() - started
