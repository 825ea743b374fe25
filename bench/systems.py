"""The systems side by side, one model at a time: the in-process loop (no server), layertap, the
naive gRPC server and LitServe, each measured at every concurrency of the run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.inputs import ModelSpec
from bench.loadgen import Call, close_all, grpc_calls, http_calls, measure, server_warmup
from bench.metrics import compiled
from bench.processes import layertap_server, litserve_server, naive_server
from bench.results import Point, Report, log, percentile


def _inprocess_extractor(spec: ModelSpec, device: str, variant: str) -> tuple[Any, bool, str]:
    """The variant's extractor (config.VARIANTS; "compiled": static shapes, one graph per batch
    size, compiled in the untimed warm-up), whether its inputs go channels-last, and its label
    suffix. The fastest variant, at its best batch size, is the baseline the targets name."""
    import torch

    from bench.pipeline import feature_extractor, load_model

    extractor = feature_extractor(load_model(spec.arch, spec.weights, device), spec.node)
    suffix = ""
    if variant != "eager":
        from layertap.server.fusion import fold_batchnorms

        suffix = f", {fold_batchnorms(extractor, {})} BatchNorms folded"  # type: ignore[arg-type]
    channels_last = variant in ("channels-last", "compiled")
    if channels_last:
        extractor = extractor.to(memory_format=torch.channels_last)
    if variant == "compiled":
        extractor = torch.compile(extractor, backend="inductor", dynamic=False)
    return extractor, channels_last, suffix


def run_inprocess(
    spec: ModelSpec,
    jpegs: list[bytes],
    device: str,
    batch_sizes: Sequence[int],
    seconds: float,
    variant: str = "eager",
) -> tuple[list[Point], Point]:
    """decode + preprocess + forward + GeM in a plain loop, per batch size; then batch-1 latency.
    `variant` (config.VARIANTS) picks the forward; "folded" is the server's own eager forward,
    so the difference is what serving costs."""
    import torch

    from bench.pipeline import gem, preprocess_jpeg

    extractor, channels_last, suffix = _inprocess_extractor(spec, device, variant)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    n = len(jpegs)

    def step(start: int, batch: int) -> None:
        x = torch.stack([preprocess_jpeg(jpegs[(start + k) % n]) for k in range(batch)])
        with torch.inference_mode():
            x = x.to(device).contiguous(memory_format=layout)
            gem(extractor(x)["feat"]).float().cpu()

    sweep = []
    for batch in batch_sizes:
        started = time.perf_counter()
        step(0, batch)  # warm-up (allocator, kernels for this batch shape; the compile)
        step(batch, batch)
        note = (
            f", compiled in {time.perf_counter() - started:.0f} s" if variant == "compiled" else ""
        )
        done, i = 0, 0
        cpu0, started = time.process_time(), time.perf_counter()
        while time.perf_counter() - started < seconds:
            step(i, batch)
            i += batch
            done += batch
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
        rate = done / elapsed
        sweep.append(
            Point(
                "in-process", spec.arch, 0, rate, float("nan"), float("nan"), float("nan"),
                done, 0, server_cpu_ms=1000 * cpu / done,
                config=f"{variant}, batch {batch}{suffix}{note}",
            )
        )  # fmt: skip
        log(f"  in-process {spec.arch} {variant} batch {batch}: {rate:.1f} images/s{note}")
    latencies: list[float] = []
    step(0, 1)
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds or len(latencies) < 20:
        t = time.perf_counter()
        step(i, 1)
        latencies.append(time.perf_counter() - t)
        i += 1
    ms = [1000 * v for v in latencies]
    b1 = Point(
        "in-process", spec.arch, 1, 1000 / statistics.mean(ms), percentile(ms, 50),
        percentile(ms, 99), statistics.mean(ms), len(ms), 0,
        config=f"{variant}, batch 1, sequential{suffix}",
    )  # fmt: skip
    log(f"  in-process {spec.arch} {variant} batch-1 latency p50 {b1.p50_ms:.1f} ms")
    return sweep, b1


def phase_inprocess(report: Report, spec: ModelSpec, jpegs: list[bytes]) -> None:
    """Every in-process variant of the run (config.VARIANTS by default): the plain loop, the
    server's own eager forward (folded), channels-last, compiled."""
    cfg = report.config
    half = cfg.timing.seconds / 2
    for variant in cfg.inprocess_variants:
        sweep, b1 = run_inprocess(spec, jpegs, cfg.device, cfg.timing.batch_sizes, half, variant)
        report.variants.setdefault(spec.arch, {})[variant] = sweep
        report.batch1_variants.setdefault(spec.arch, {})[variant] = b1


async def _warm(
    make: Callable[[int], Call], timing: Any, system: str, arch: str, murl: str | None
) -> None:
    """A warm-up; then, for layertap, wait for the background compiles it started (every
    batch size it formed) and warm up again, so the points measure the steady state."""
    await server_warmup(make, timing.warmup)
    if murl:
        waited = await compiled(murl)
        if waited > 1:
            log(f"  {system} {arch}: waited {waited:.0f} s for background compiles")
            await server_warmup(make, timing.warmup)


async def _grpc_points(
    report: Report,
    spec: ModelSpec,
    jpegs: list[bytes],
    system: str,
    pid: int,
    target: str,
    config: str = "",
    metrics_url: str | None = None,
) -> None:
    """layertap and the naive server are driven alike: one shared client (same code, same
    client cost), a warm-up, then a point at every concurrency."""
    from layertap.client import AsyncFeatureClient

    timing = report.config.timing
    async with AsyncFeatureClient(target) as client:
        make = grpc_calls(client, spec.arch, spec.node, jpegs)
        await _warm(make, timing, system, spec.arch, metrics_url)
        for c in timing.concurrency:
            p = await measure(
                system, spec.arch, pid, make, c, timing.warmup, timing.seconds, config=config,
                metrics_url=metrics_url,
            )  # fmt: skip
            report.points.append(p)


async def phase_layertap(report: Report, spec: ModelSpec, jpegs: list[bytes], logdir: Path) -> None:
    cfg = report.config
    with layertap_server([spec], cfg.device, logdir, cfg.layertap) as (proc, target, murl):
        if "v2" in cfg.systems and proc.http_port is not None:
            await _with_v2(report, spec, jpegs, proc.pid, target, proc.http_port, murl)
        else:
            await _grpc_points(report, spec, jpegs, "layertap", proc.pid, target, metrics_url=murl)


async def _with_v2(
    report: Report,
    spec: ModelSpec,
    jpegs: list[bytes],
    pid: int,
    target: str,
    http_port: int,
    murl: str,
) -> None:
    """The same server over its own API and its KServe v2 endpoints (bench/v2_calls.py), each
    warmed up first (background compiles done), then at each concurrency the three in turn, so
    no protocol is measured in another state of the server than the others."""
    import grpc

    from bench.v2_calls import v2_grpc_calls, v2_http_calls
    from layertap.client import AsyncFeatureClient
    from layertap.kserve.v2 import open_inference_pb2_grpc as kpb_grpc

    timing = report.config.timing
    async with AsyncFeatureClient(target) as client, grpc.aio.insecure_channel(target) as channel:
        own = grpc_calls(client, spec.arch, spec.node, jpegs)
        v2 = v2_grpc_calls(kpb_grpc.GRPCInferenceServiceStub(channel), spec.arch, spec.node, jpegs)
        http, conns = v2_http_calls(http_port, spec.arch, spec.node, jpegs)
        await server_warmup(http, timing.warmup / 2, conns)
        await server_warmup(v2, timing.warmup / 2)
        await _warm(own, timing, "layertap", spec.arch, murl)
        for c in timing.concurrency:
            for system, make, url in (("layertap", own, murl), ("layertap v2 gRPC", v2, None)):
                p = await measure(
                    system, spec.arch, pid, make, c, timing.warmup, timing.seconds, metrics_url=url
                )
                report.points.append(p)
            http, conns = v2_http_calls(http_port, spec.arch, spec.node, jpegs)
            p = await measure(
                "layertap v2 HTTP", spec.arch, pid, http, c, timing.warmup, timing.seconds
            )
            close_all(conns)
            report.points.append(p)


async def phase_naive(report: Report, spec: ModelSpec, jpegs: list[bytes], logdir: Path) -> None:
    cfg = report.config
    with naive_server(spec, cfg.device, logdir, cfg.naive_threads) as (proc, target):
        label = f"{cfg.naive_threads} threads"
        await _grpc_points(report, spec, jpegs, "naive gRPC", proc.pid, target, config=label)


def _litserve_label(max_batch: int, timeout_s: float) -> str:
    return f"max_batch_size={max_batch}, batch_timeout={timeout_s * 1000:g} ms"


async def _litserve_points(
    spec: ModelSpec,
    jpegs: list[bytes],
    logdir: Path,
    report: Report,
    setting: tuple[int, float],
    concurrencies: Sequence[int],
    warmup: float,
    seconds: float,
) -> list[Point]:
    """One LitServe server with one batching setting, measured at each concurrency."""
    device = report.config.device
    with litserve_server(spec, device, logdir, *setting) as (proc, port):
        make, conns = http_calls(port, jpegs)
        await server_warmup(make, report.config.timing.warmup, conns)
        points = []
        for c in concurrencies:
            make, conns = http_calls(port, jpegs)
            p = await measure(
                "LitServe", spec.arch, proc.pid, make, c, warmup, seconds,
                config=_litserve_label(*setting),
            )  # fmt: skip
            close_all(conns)
            points.append(p)
    return points


async def phase_litserve(report: Report, spec: ModelSpec, jpegs: list[bytes], logdir: Path) -> None:
    """LitServe at its best batching setting: with more than one setting to try, a short sweep
    at c=1 and at the largest concurrency up to 16 picks the fastest there."""
    timing = report.config.timing
    settings = list(timing.litserve_sweep)
    sweep_c = max(c for c in timing.concurrency if c <= 16)
    if len(settings) > 1:
        sweep: list[Point] = []
        for setting in settings:
            sweep += await _litserve_points(
                spec, jpegs, logdir, report, setting, sorted({1, sweep_c}),
                timing.warmup / 2, timing.sweep_seconds,
            )  # fmt: skip
        report.litserve_sweep[spec.arch] = sweep
        best = max((p for p in sweep if p.concurrency == sweep_c), key=lambda p: p.images_per_s)
        chosen = next(s for s in settings if _litserve_label(*s) == best.config)
        log(f"  LitServe best at c={sweep_c}: {best.config}")
    else:
        chosen = settings[0]
    report.litserve_best[spec.arch] = _litserve_label(*chosen)
    report.points += await _litserve_points(
        spec, jpegs, logdir, report, chosen, timing.concurrency, timing.warmup, timing.seconds
    )
