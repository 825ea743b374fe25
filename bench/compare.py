"""layertap side by side with its peers, on one machine, one image per request.

Run (full, about 10-15 minutes on a 2-core machine; writes the report):

    .venv/bin/python bench/compare.py --out docs/BENCHMARKS.md

Smoke run (under about 2 minutes, short points, mobilenet_v2 only, no LitServe sweep, noisy):
add `--quick`. On a GPU machine add `--device cuda` (and write to another file, e.g.
`--out docs/BENCHMARKS_GPU.md`). LitServe comes from the `bench` extra
(`.venv/bin/pip install -e '.[bench]'`); without it, pass `--systems inprocess,layertap,naive`.
Experiments: `--layertap-arg=--max-wait-ms=5` (any `layertap serve` flag, repeatable) and
`--layertap-env KEY=VALUE` and `--layertap-model-key KEY=TOML` (a `[[models]]` key, e.g.
`--layertap-model-key channels_last=true`) change the layertap servers only. A hand-written
block between `<!-- analysis: kept by bench/compare.py -->` and `<!-- /analysis -->` in the --out
file survives regeneration.

For each model (default mobilenet_v2 `features.18` with its real ImageNet weights from the torch
cache, and resnet50 `layer4` with random init: throughput does not depend on the weights) at
224 px, with real JPEG photos encoded once and reused, and the same descriptor everywhere (GeM,
p=3, of that node's feature map, float32), it measures:

1. in-process: decode + preprocess + forward (graph cut at the node) + GeM in one loop, no
   server, for each batch size of a sweep; and batch-1 latency (the baseline: what users
   write); then the same loop with BatchNorms folded as layertap's extractors fold them
   (reference rows: the server's own forward, so the gap to them is what serving costs);
2. layertap over gRPC on loopback: `layertap serve` in a subprocess with its default settings,
   driven by `AsyncFeatureClient` (default settings) at each concurrency;
3. a naive per-request gRPC server (bench/naive_server.py), same client, same concurrencies;
4. LitServe (bench/litserve_app.py) with dynamic batching, max_batch_size x batch_timeout from
   a small sweep, the best at concurrency 16 run at every concurrency; over HTTP/1.1 keep-alive
   (one connection per in-flight request);
5. memory: the layertap server's RSS with 1 and with 20 distinct node sets of resnet50 cached;
6. mixed traffic: 4 clients, each its own node set of resnet50, with and without forward
   sharing (`share_forwards`), images/s and forwards run (layertap_batch_size count).

The load generator is one asyncio loop in this process: closed loop, N requests in flight;
throughput counts responses that complete inside the measured window (warm-up excluded),
latencies are those responses' client-observed times. Client and servers share the machine's
cores, so the client's own cost is reported per point (CPU ms per image) next to the server's.
Prints one PASS/FAIL line per target of the issue and writes the Markdown report to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

DEFAULT_MODELS = ("mobilenet_v2:features.18", "resnet50:layer4")
SYSTEMS = ("inprocess", "layertap", "naive", "litserve")
FULL = {
    "concurrency": (1, 4, 16, 64),
    "batch_sizes": (1, 2, 4, 8, 16),
    "seconds": 8.0,
    "warmup": 2.0,
    "sweep_seconds": 4.0,
    "litserve_sweep": ((4, 0.0), (8, 0.0), (16, 0.0), (8, 0.005), (8, 0.02), (16, 0.01)),
    "node_sets": 20,
    "memory_burst": 16,
    "memory_passes": 2,
}
QUICK = {
    "concurrency": (1, 4, 16),
    "batch_sizes": (1, 4, 8),
    "seconds": 2.0,
    "warmup": 1.0,
    "sweep_seconds": 1.5,
    "litserve_sweep": ((8, 0.0),),  # no sweep in quick mode
    "node_sets": 20,
    "memory_burst": 4,
    "memory_passes": 1,
}
MIXED_CLIENTS = 4
ENV_ARGS: list[str] = []  # --layertap-env KEY=VALUE, for layertap servers
MODEL_KEYS: list[str] = []  # --layertap-model-key KEY=TOML, added to each layertap [[models]]


# ---------------------------------------------------------------------------------- helpers
def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def rss_bytes(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (psutil when present)."""
    try:
        import psutil
    except ImportError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return float("nan")
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def cuda_memory_by_pid(pid: int) -> int | None:
    """GPU memory nvidia-smi reports for one process, in bytes (None without nvidia-smi)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        text = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return int(float(parts[1])) * 1024 * 1024
    return None


# ---------------------------------------------------------------------------------- inputs
def photos() -> list[tuple[str, bytes]]:
    """Real photos, each encoded once as JPEG (quality 90) and reused by every system."""
    import matplotlib.cbook
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_image

    arrays: list[tuple[str, np.ndarray]] = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        arrays.append((name, np.asarray(getattr(skimage.data, name)())))
    for name in ("china.jpg", "flower.jpg"):
        arrays.append((name.split(".")[0], np.asarray(load_sample_image(name))))
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        arrays.append(("grace_hopper", np.asarray(Image.open(fh).convert("RGB"))))
    out = []
    for name, array in arrays:
        buf = io.BytesIO()
        Image.fromarray(array[..., :3]).save(buf, "JPEG", quality=90)
        out.append((name, buf.getvalue()))
    return out


def cached_weights(arch: str) -> str | None:
    """The torchvision weights name of `arch` whose file is already in the torch cache."""
    import torch
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        return None
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for w in enum:
        if (checkpoints / os.path.basename(w.url)).is_file():
            return w.name
    return None


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    node: str
    weights: str | None  # torchvision weights name, or None: random init

    @property
    def weights_label(self) -> str:
        return f"ImageNet ({self.weights})" if self.weights else "random init"


def parse_model(text: str, allow_weights: bool = True) -> ModelSpec:
    arch, sep, node = text.partition(":")
    if not sep or not node:
        raise SystemExit(f"--models entries are arch:node (e.g. resnet50:layer4), got {text!r}")
    return ModelSpec(arch, node, cached_weights(arch) if allow_weights else None)


# ---------------------------------------------------------------------------------- results
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
    args: argparse.Namespace
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
    layertap_settings: str = ""

    def get(self, system: str, model: str, concurrency: int) -> Point | None:
        for p in self.points:
            if p.system == system and p.model == model and p.concurrency == concurrency:
                return p
        return None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- in-process
def run_inprocess(
    spec: ModelSpec,
    jpegs: list[bytes],
    device: str,
    batch_sizes: Sequence[int],
    seconds: float,
    fold: bool = False,
) -> tuple[list[Point], Point]:
    """decode + preprocess + forward + GeM in a plain loop, per batch size; then batch-1 latency.
    With `fold`, the graph has its BatchNorms folded as layertap's extractors do (the same
    forward as the server's, so the difference is what serving costs)."""
    import torch
    from pipeline import feature_extractor, gem, load_model, preprocess_jpeg

    extractor = feature_extractor(load_model(spec.arch, spec.weights, device), spec.node)
    suffix = ""
    if fold:
        from layertap.server.fusion import fold_batchnorms

        suffix = f", {fold_batchnorms(extractor, {})} BatchNorms folded"  # type: ignore[arg-type]
    n = len(jpegs)

    def step(start: int, batch: int) -> None:
        x = torch.stack([preprocess_jpeg(jpegs[(start + k) % n]) for k in range(batch)])
        with torch.inference_mode():
            gem(extractor(x.to(device))["feat"]).float().cpu()

    sweep = []
    for batch in batch_sizes:
        step(0, batch)  # warm-up (allocator, kernels for this batch shape)
        step(batch, batch)
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
                done, 0, server_cpu_ms=1000 * cpu / done, config=f"batch {batch}{suffix}",
            )
        )  # fmt: skip
        log(f"  in-process {spec.arch} batch {batch}: {rate:.1f} images/s")
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
        config=f"batch 1, sequential{suffix}",
    )  # fmt: skip
    log(f"  in-process {spec.arch} batch-1 latency p50 {b1.p50_ms:.1f} ms")
    return sweep, b1


# ---------------------------------------------------------------------------------- load
Call = Callable[[int], Awaitable[dict[str, float] | None]]


@dataclass
class LoadResult:
    latencies_ms: list[float]
    extras: list[dict[str, float]]
    errors: int
    seconds: float
    first_error: str = ""


async def closed_loop(
    make_call: Callable[[int], Call], concurrency: int, warmup: float, seconds: float
) -> LoadResult:
    """`concurrency` workers, each sending its next request when the previous one returns.
    Responses completing inside [warm-up end, end] count; the rest are discarded."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + warmup
    t_end = t0 + seconds
    latencies: list[float] = []
    extras: list[dict[str, float]] = []
    errors = 0
    first_error = ""

    async def worker(k: int) -> None:
        nonlocal errors, first_error
        call = make_call(k)
        i = k
        while True:
            s = loop.time()
            if s >= t_end:
                return
            try:
                extra = await call(i)
            except Exception as exc:  # counted and reported, never hidden
                e = loop.time()
                if t0 <= e <= t_end:
                    errors += 1
                first_error = first_error or f"{type(exc).__name__}: {str(exc)[:200]}"
                await asyncio.sleep(0.05)
                continue
            e = loop.time()
            if t0 <= e <= t_end:
                latencies.append(1000 * (e - s))
                if extra:
                    extras.append(extra)
            i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return LoadResult(latencies, extras, errors, seconds, first_error)


def point_from(
    system: str,
    model: str,
    concurrency: int,
    result: LoadResult,
    server_cpu_s: float,
    client_cpu_s: float,
    config: str = "",
) -> Point:
    lat = result.latencies_ms
    done = len(lat)
    per = 1000 / done if done else float("nan")
    p = Point(
        system, model, concurrency, done / result.seconds, percentile(lat, 50),
        percentile(lat, 99), statistics.mean(lat) if lat else float("nan"), done,
        result.errors, server_cpu_s * per, client_cpu_s * per, config,
    )  # fmt: skip
    if result.extras:
        for key in result.extras[0]:
            p.extra[key] = statistics.mean(x[key] for x in result.extras)
    if result.first_error:
        log(f"  {system} c={concurrency}: {result.errors} errors, first: {result.first_error}")
    return p


async def measure(
    system: str,
    model: str,
    pid: int,
    make_call: Callable[[int], Call],
    concurrency: int,
    warmup: float,
    seconds: float,
    config: str = "",
    metrics_url: str | None = None,
) -> Point:
    """One point; server CPU and (for layertap) Prometheus deltas over the measured window.
    CPU time is sampled around the whole run and scaled to the window (warm-up included in
    the sample, so the per-image figure is a slight overestimate at most equal for all)."""
    cpu0, client0 = tree_cpu_seconds(pid), time.process_time()
    before = scrape(metrics_url) if metrics_url else None
    t = time.perf_counter()
    result = await closed_loop(make_call, concurrency, warmup, seconds)
    wall = time.perf_counter() - t
    after = scrape(metrics_url) if metrics_url else None
    scale = seconds / wall if wall > 0 else 1.0
    server_cpu = (tree_cpu_seconds(pid) - cpu0) * scale
    client_cpu = (time.process_time() - client0) * scale
    p = point_from(system, model, concurrency, result, server_cpu, client_cpu, config)
    if before is not None and after is not None:
        p.extra.update(stage_breakdown(before, after, model))
        p.extra["forwards_per_s"] = p.extra["forwards"] / wall
    log(
        f"  {system} {model} c={concurrency}{' ' + config if config else ''}: "
        f"{p.images_per_s:.1f} images/s, p50 {p.p50_ms:.0f} ms, p99 {p.p99_ms:.0f} ms, "
        f"errors {p.errors}"
    )
    return p


# ---------------------------------------------------------------------------------- metrics
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(url: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value}."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if want else name
    if key in samples:
        return samples[key]
    # labels in another order
    for k, v in samples.items():
        if k.startswith(name + "{") and all(f'{a}="{b}"' in k for a, b in labels.items()):
            return v
    return 0.0


def stage_breakdown(before: dict[str, float], after: dict[str, float], model: str) -> dict:
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
    n = delta("layertap_request_duration_seconds_count", method="Extract")
    s = delta("layertap_request_duration_seconds_sum", method="Extract")
    out["server_request_ms"] = 1000 * s / n if n else float("nan")
    return out


# ---------------------------------------------------------------------------------- processes
class Proc:
    """A server subprocess in its own process group, stopped by its own id."""

    def __init__(self, name: str, cmd: list[str], logdir: Path, env: dict | None = None):
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.popen = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}; log tail:\n{self.tail()}"
            )

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()


def wait_until(check: Callable[[], bool], proc: Proc, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s; log tail:\n{proc.tail()}")


def layertap_supports(flag: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "layertap.client", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    ).stdout
    return flag in out


@contextlib.contextmanager
def layertap_server(
    specs: Sequence[ModelSpec], device: str, logdir: Path, extra: Sequence[str] = ()
) -> Iterator[tuple[Proc, str, str]]:
    """`layertap serve` with a TOML config; yields (process, target, metrics URL)."""
    port, metrics_port = free_port(), free_port()
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        f"metrics_port = {metrics_port}",
        'log_level = "WARNING"',
        "shutdown_delay_s = 0",
        "shutdown_grace_s = 2",
        "",
    ]
    for spec in specs:
        lines += [
            "[[models]]",
            f'name = "{spec.arch}"',
            f'arch = "{spec.arch}"',
            f'weights = "{spec.weights or "none"}"',
            "allow_random = true",
            *MODEL_KEYS,
            "",
        ]
    config = logdir / f"layertap-{port}.toml"
    config.write_text("\n".join(lines))
    cmd = [sys.executable, "-m", "layertap.client", "serve", "--config", str(config)]
    cmd += ["--device", device, *extra]
    env = dict(kv.split("=", 1) for kv in ENV_ARGS)
    proc = Proc(f"layertap-{port}", cmd, logdir, env)
    target = f"127.0.0.1:{port}"
    try:
        from layertap.client import FeatureClient

        with FeatureClient(target, timeout=5, retries=0) as client:

            def ready() -> bool:
                models = client.list_models()
                return bool(models) and all(m.ready for m in models)

            wait_until(ready, proc, 600, "layertap")
        yield proc, target, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        proc.stop()


@contextlib.contextmanager
def naive_server(
    spec: ModelSpec, device: str, logdir: Path, threads: int
) -> Iterator[tuple[Proc, str]]:
    port = free_port()
    cmd = [
        sys.executable, str(HERE / "naive_server.py"), "--arch", spec.arch, "--node", spec.node,
        "--weights", spec.weights or "none", "--port", str(port), "--device", device,
        "--threads", str(threads),
    ]  # fmt: skip
    proc = Proc(f"naive-{port}", cmd, logdir)
    target = f"127.0.0.1:{port}"
    try:
        # the naive server binds its port after loading the model and then says so
        wait_until(lambda: "ready on" in proc.tail(5), proc, 600, "naive server")
        yield proc, target
    finally:
        proc.stop()


@contextlib.contextmanager
def litserve_server(
    spec: ModelSpec, device: str, logdir: Path, max_batch: int, timeout_s: float
) -> Iterator[tuple[Proc, int]]:
    port = free_port()
    cmd = [
        sys.executable, str(HERE / "litserve_app.py"), "--arch", spec.arch, "--node", spec.node,
        "--weights", spec.weights or "none", "--port", str(port), "--device", device,
        "--max-batch-size", str(max_batch), "--batch-timeout", str(timeout_s),
    ]  # fmt: skip
    proc = Proc(f"litserve-{port}", cmd, logdir)
    try:

        def ready() -> bool:
            url = f"http://127.0.0.1:{port}/health"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200 and r.read().strip().strip(b'"') == b"ok"

        wait_until(ready, proc, 600, "LitServe")
        yield proc, port
    finally:
        proc.stop()


# ---------------------------------------------------------------------------------- clients
def grpc_calls(client: Any, model: str, node: str, jpegs: list[bytes]) -> Callable[[int], Call]:
    """One shared AsyncFeatureClient (one channel, multiplexed), one image per request."""
    n = len(jpegs)

    def make(_: int) -> Call:
        async def call(i: int) -> dict[str, float] | None:
            r = await client.extract(jpegs[i % n], model=model, nodes=node, pool="gem")
            t = r.metadata.timings
            if t.total_ms <= 0:  # the naive server sends no timings
                return None
            return {
                "t_queue_ms": t.queue_ms,
                "t_decode_ms": t.decode_ms,
                "t_compute_ms": t.compute_ms,
                "t_total_ms": t.total_ms,
                "t_batch": float(r.metadata.batch_size),
            }

        return call

    return make


class HttpConnection:
    """Minimal HTTP/1.1 keep-alive client on asyncio streams (cheap: no framework)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            self.writer.write(head + body)
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (x.partition(":") for x in lines[1:] if x)
            }
            if "content-length" not in headers:
                raise RuntimeError(f"HTTP {status} without Content-Length")
            data = await self.reader.readexactly(int(headers["content-length"]))
            if headers.get("connection", "").lower() == "close":
                self.close()
        except BaseException:
            self.close()
            raise
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
        return data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def http_calls(port: int, jpegs: list[bytes]) -> tuple[Callable[[int], Call], list[HttpConnection]]:
    """One keep-alive connection per in-flight request; request bodies built once."""
    bodies = [json.dumps({"image": base64.b64encode(j).decode("ascii")}).encode() for j in jpegs]
    conns: list[HttpConnection] = []
    n = len(bodies)

    def make(_: int) -> Call:
        conn = HttpConnection(port)
        conns.append(conn)

        async def call(i: int) -> None:
            data = await conn.post("/predict", bodies[i % n])
            desc = np.frombuffer(base64.b64decode(json.loads(data)["descriptor"]), np.float32)
            if desc.size == 0:
                raise RuntimeError("empty descriptor")
            return None

        return call

    return make, conns


# ---------------------------------------------------------------------------------- phases
async def phase_layertap(
    report: Report, spec: ModelSpec, jpegs: list[bytes], cfg: dict, logdir: Path
) -> None:
    from layertap.client import AsyncFeatureClient

    args = report.args
    with layertap_server([spec], args.device, logdir, args.layertap_arg) as (proc, target, murl):
        async with AsyncFeatureClient(target) as client:
            make = grpc_calls(client, spec.arch, spec.node, jpegs)
            await server_warmup(make, cfg)
            for c in cfg["concurrency"]:
                p = await measure(
                    "layertap", spec.arch, proc.pid, make, c, cfg["warmup"], cfg["seconds"],
                    metrics_url=murl,
                )  # fmt: skip
                report.points.append(p)


async def phase_naive(
    report: Report, spec: ModelSpec, jpegs: list[bytes], cfg: dict, logdir: Path
) -> None:
    from layertap.client import AsyncFeatureClient

    args = report.args
    with naive_server(spec, args.device, logdir, args.naive_threads) as (proc, target):
        async with AsyncFeatureClient(target) as client:
            make = grpc_calls(client, spec.arch, spec.node, jpegs)
            await server_warmup(make, cfg)
            for c in cfg["concurrency"]:
                p = await measure(
                    "naive gRPC", spec.arch, proc.pid, make, c, cfg["warmup"], cfg["seconds"],
                    config=f"{args.naive_threads} threads",
                )  # fmt: skip
                report.points.append(p)


async def phase_litserve(
    report: Report, spec: ModelSpec, jpegs: list[bytes], cfg: dict, logdir: Path
) -> None:
    args = report.args
    configs = list(cfg["litserve_sweep"])
    sweep: list[Point] = []
    sweep_c = max(c for c in cfg["concurrency"] if c <= 16)

    def label(max_batch: int, timeout_s: float) -> str:
        return f"max_batch_size={max_batch}, batch_timeout={timeout_s * 1000:g} ms"

    if len(configs) > 1:
        for max_batch, timeout_s in configs:
            with litserve_server(spec, args.device, logdir, max_batch, timeout_s) as (proc, port):
                await server_warmup(http_calls(port, jpegs), cfg)
                for c in sorted({1, sweep_c}):
                    make, conns = http_calls(port, jpegs)
                    p = await measure(
                        "LitServe", spec.arch, proc.pid, make, c, cfg["warmup"] / 2,
                        cfg["sweep_seconds"], config=label(max_batch, timeout_s),
                    )  # fmt: skip
                    close_all(conns)
                    sweep.append(p)
        report.litserve_sweep[spec.arch] = sweep
        best = max((p for p in sweep if p.concurrency == sweep_c), key=lambda p: p.images_per_s)
        max_batch, timeout_s = next(mt for mt in configs if label(*mt) == best.config)
        log(f"  LitServe best at c={sweep_c}: {best.config}")
    else:
        max_batch, timeout_s = configs[0]
    report.litserve_best[spec.arch] = label(max_batch, timeout_s)
    with litserve_server(spec, args.device, logdir, max_batch, timeout_s) as (proc, port):
        await server_warmup(http_calls(port, jpegs), cfg)
        for c in cfg["concurrency"]:
            make, conns = http_calls(port, jpegs)
            p = await measure(
                "LitServe", spec.arch, proc.pid, make, c, cfg["warmup"], cfg["seconds"],
                config=label(max_batch, timeout_s),
            )  # fmt: skip
            close_all(conns)
            report.points.append(p)


def close_all(conns: list[HttpConnection]) -> None:
    for conn in conns:
        conn.close()


async def server_warmup(calls: Any, cfg: dict) -> None:
    """Once per server start: a few seconds of load at several concurrencies, discarded, so
    every batch shape the points will see has run once (allocator, kernel caches)."""
    conns: list[HttpConnection] = []
    if isinstance(calls, tuple):  # HTTP: (make, connections)
        calls, conns = calls
    for c in (2, 5, 16):
        await closed_loop(calls, c, 0.0, cfg["warmup"] / 2)
    close_all(conns)


def spaced_node_sets(nodes: Sequence[Any], main: str, count: int) -> list[list[str]]:
    """`main` first, then count-1 single nodes spread evenly over the model's 4-D nodes."""
    names = [n.name for n in nodes if n.layout in ("NCHW", "NHWC") and n.name != main]
    if count - 1 > len(names):
        raise RuntimeError(f"only {len(names)} candidate nodes for {count} node sets")
    picks = np.linspace(0, len(names) - 1, count - 1).round().astype(int)
    return [[main]] + [[names[i]] for i in dict.fromkeys(int(i) for i in picks)]


async def phase_memory(
    report: Report, spec: ModelSpec, jpegs: list[bytes], cfg: dict, logdir: Path
):
    from layertap.client import AsyncFeatureClient

    args = report.args
    count = cfg["node_sets"]
    with layertap_server([spec], args.device, logdir, args.layertap_arg) as (proc, target, murl):
        async with AsyncFeatureClient(target) as client:
            desc = await client.describe(spec.arch)
            main = (await client.extract(jpegs[0], model=spec.arch, nodes=spec.node)).nodes
            main_full = next(iter(main.values()))
            sets = spaced_node_sets(desc.nodes, main_full, count)
            burst = cfg["memory_burst"]  # concurrent requests per round: fills whole batches

            async def rounds(nodes: list[str], n: int) -> None:
                for r in range(n):
                    await asyncio.gather(
                        *(
                            client.extract(
                                jpegs[(r * burst + k) % len(jpegs)],
                                model=spec.arch,
                                nodes=nodes,
                                pool="gem",
                            )
                            for k in range(burst)
                        )
                    )

            def snapshot() -> dict[str, float]:
                time.sleep(0.5)
                m = scrape(murl)
                snap: dict[str, float] = {
                    "rss": rss_bytes(proc.pid).get("VmRSS", 0),
                    "hwm": rss_bytes(proc.pid).get("VmHWM", 0),
                    "cache_entries": metric(m, "layertap_extractor_cache_entries", model=spec.arch),
                }
                cuda = metric(m, "layertap_cuda_memory_allocated_bytes", device=args.device)
                if args.device.startswith("cuda"):
                    snap["cuda_allocated"] = cuda
                    snap["cuda_nvidia_smi"] = cuda_memory_by_pid(proc.pid) or float("nan")
                return snap

            ready = snapshot()
            await rounds(sets[0], 3)
            one = snapshot()
            for nodes in sets[1:]:
                await rounds(nodes, 1)
            for _ in range(cfg["memory_passes"] - 1):  # every set again: all cached and used
                for nodes in sets:
                    await rounds(nodes, 1)
            twenty = snapshot()
    report.memory = {
        "model": spec.arch,
        "sets": sets,
        "ready": ready,
        "one": one,
        "twenty": twenty,
        "ratio": twenty["rss"] / one["rss"] if one["rss"] else float("nan"),
        "burst": cfg["memory_burst"],
        "passes": cfg["memory_passes"],
    }
    log(
        f"  memory {spec.arch}: RSS {one['rss'] / 2**20:.0f} MiB with 1 node set, "
        f"{twenty['rss'] / 2**20:.0f} MiB with {len(sets)} ({report.memory['ratio']:.3f}x)"
    )


async def phase_mixed(report: Report, spec: ModelSpec, jpegs: list[bytes], cfg: dict, logdir: Path):
    from layertap.client import AsyncFeatureClient

    args = report.args
    supported = layertap_supports("--share-forwards")
    modes: list[bool | None] = [True, False] if supported else [None]
    if not supported:
        report.notes.append(
            "This layertap has no `share_forwards` setting yet: mixed traffic was measured once, "
            "with the server's current behaviour (requests for different node sets of one model "
            "share a forward); rerun when the setting exists to get the 'no sharing' row."
        )
    for share in modes:
        extra = list(args.layertap_arg)
        if share is not None:
            extra += ["--share-forwards", "true" if share else "false"]
        with layertap_server([spec], args.device, logdir, extra) as (proc, target, murl):
            clients = [AsyncFeatureClient(target) for _ in range(MIXED_CLIENTS)]
            try:
                desc = await clients[0].describe(spec.arch)
                r = await clients[0].extract(jpegs[0], model=spec.arch, nodes=spec.node)
                sets = spaced_node_sets(desc.nodes, next(iter(r.nodes.values())), 7)
                chosen = [sets[0], sets[2], sets[4], sets[6]][:MIXED_CLIENTS]
                per_client = args.mixed_inflight

                def make(k: int, clients: list = clients, chosen: list = chosen) -> Call:
                    client = clients[k % MIXED_CLIENTS]
                    nodes = chosen[k % MIXED_CLIENTS]

                    async def call(i: int) -> None:
                        image = jpegs[i % len(jpegs)]
                        await client.extract(image, model=spec.arch, nodes=nodes, pool="gem")
                        return None

                    return call

                label = {True: "on", False: "off", None: "current server (shares)"}[share]
                p = await measure(
                    "layertap mixed", spec.arch, proc.pid, make, MIXED_CLIENTS * per_client,
                    cfg["warmup"], cfg["seconds"], config=f"share_forwards {label}",
                    metrics_url=murl,
                )  # fmt: skip
            finally:
                for c in clients:
                    await c.close()
        report.mixed.append(
            {
                "share": label,
                "node_sets": [",".join(s) for s in chosen],
                "clients": MIXED_CLIENTS,
                "inflight": per_client,
                "point": p,
            }
        )


# ---------------------------------------------------------------------------------- targets
@dataclass
class Target:
    what: str
    model: str
    measured: str
    required: str
    ok: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return "SKIP" if self.ok is None else ("PASS" if self.ok else "FAIL")


def best_litserve(
    report: Report, model: str, c: int, key: str, better: Callable, sweep: bool = True
) -> Point | None:
    """LitServe's best figure at concurrency c over the final run and (with `sweep`) the tuning
    sweep: the most favourable to LitServe, so comparisons with it are conservative."""
    cands = [p for p in report.points if p.system == "LitServe" and p.model == model]
    if sweep:
        cands += report.litserve_sweep.get(model, [])
    cands = [p for p in cands if p.concurrency == c and np.isfinite(getattr(p, key))]
    return better(cands, key=lambda p: getattr(p, key)) if cands else None


def evaluate(report: Report) -> list[Target]:
    targets: list[Target] = []
    for spec in report.models:
        m = spec.arch
        sweep = report.inprocess.get(m, [])
        ip = max(sweep, key=lambda p: p.images_per_s) if sweep else None
        b1 = report.batch1.get(m)
        for c in (4, 16):
            lt = report.get("layertap", m, c)
            ls = best_litserve(report, m, c, "images_per_s", max)
            lt_rate = fmt(lt.images_per_s) if lt else "–"
            targets.append(
                Target(
                    f"throughput c={c} ≥ LitServe", m,
                    f"{lt_rate} vs {fmt(ls.images_per_s) if ls else '–'} images/s",
                    "≥ 1.00×",
                    None if not (lt and ls) else lt.images_per_s >= ls.images_per_s,
                )
            )  # fmt: skip
            ratio = (
                f" ({ip.config}) = {lt.images_per_s / ip.images_per_s:.2f}×" if lt and ip else ""
            )
            targets.append(
                Target(
                    f"throughput c={c} ≥ 0.95× in-process", m,
                    f"{lt_rate} vs {fmt(ip.images_per_s) if ip else '–'} images/s{ratio}",
                    "≥ 0.95×",
                    None if not (lt and ip) else lt.images_per_s >= 0.95 * ip.images_per_s,
                )
            )  # fmt: skip
        lt1 = report.get("layertap", m, 1)
        ls1 = best_litserve(report, m, 1, "p50_ms", min)
        targets.append(
            Target(
                "p50 c=1 ≤ LitServe", m,
                f"{fmt(lt1.p50_ms) if lt1 else '–'} vs {fmt(ls1.p50_ms) if ls1 else '–'} ms",
                "≤", None if not (lt1 and ls1) else lt1.p50_ms <= ls1.p50_ms,
            )
        )  # fmt: skip
        targets.append(
            Target(
                "p50 c=1 within 5 ms of in-process batch 1", m,
                f"{fmt(lt1.p50_ms) if lt1 else '–'} vs {fmt(b1.p50_ms) if b1 else '–'} ms"
                + (f" ({lt1.p50_ms - b1.p50_ms:+.1f})" if lt1 and b1 else ""),
                "≤ +5 ms", None if not (lt1 and b1) else lt1.p50_ms <= b1.p50_ms + 5,
            )
        )  # fmt: skip
        lt16 = report.get("layertap", m, 16)
        naive16 = report.get("naive gRPC", m, 16)
        # p99 from the final run only: the sweep's short points have too few samples for a p99
        ls16 = best_litserve(report, m, 16, "p99_ms", min, sweep=False)
        peers = [p for p in (naive16, ls16) if p is not None]
        ok = None if not (lt16 and naive16 and ls16) else all(lt16.p99_ms < p.p99_ms for p in peers)
        targets.append(
            Target(
                "p99 c=16 below naive and LitServe", m,
                f"{fmt(lt16.p99_ms, 0) if lt16 else '–'} vs naive "
                f"{fmt(naive16.p99_ms, 0) if naive16 else '–'}, LitServe "
                f"{fmt(ls16.p99_ms, 0) if ls16 else '–'} ms",
                "<", ok,
            )
        )  # fmt: skip
    mem = report.memory
    if mem:
        n = len(mem["sets"])
        targets.append(
            Target(
                f"RSS with {n} node sets ≤ 1.1× RSS with 1", mem["model"],
                f"{mem['twenty']['rss'] / 2**20:.0f} vs {mem['one']['rss'] / 2**20:.0f} MiB "
                f"= {mem['ratio']:.3f}×",
                "≤ 1.10×", mem["ratio"] <= 1.1,
            )
        )  # fmt: skip
    else:
        targets.append(Target("RSS 20 node sets ≤ 1.1× 1", "–", "not measured", "≤ 1.10×", None))
    return targets


# ---------------------------------------------------------------------------------- report
def machine_line(device: str) -> str:
    import torch
    import torchvision

    gpu = ""
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name()}"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {mem_total_gib():.0f} GiB RAM{gpu}; "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    )


def render(report: Report, targets: list[Target]) -> str:
    a = report.args
    lines: list[str] = []
    add = lines.append
    add("# layertap benchmarks: side by side with its peers")
    add("")
    add(f"Generated by `bench/compare.py` ({report.mode} mode). Command:")
    add("")
    add("```bash")
    add(f".venv/bin/python bench/compare.py {' '.join(a.argv)}".rstrip())
    add("```")
    add("")
    if a.quick:
        add("**Quick mode**: short points (smoke run), figures are indicative only. The full "
            "report (10–15 min on 2 cores): `.venv/bin/python bench/compare.py --out "
            "docs/BENCHMARKS.md`.")  # fmt: skip
        add("")
    add(f"- **Machine**: {machine_line(a.device)}. Device: `{a.device}`.")
    add(f"- **Date**: {report.started} UTC; load average at start {report.load_start}, "
        f"at end {report.load_end} (client and servers share the cores).")  # fmt: skip
    add("- **Workload**: one JPEG photo per request (astronaut, chelsea, coffee, rocket, china, "
        "flower, grace_hopper; encoded once at quality 90), 224 px after resize 256 + centre "
        "crop, descriptor = GeM (p=3) of the node's feature map, float32. The in-process loop "
        "and the LitServe app decode with torchvision's JPEG decoder and resize the uint8 image "
        "with `transforms.v2` (its fast uint8 kernel), as layertap does by default "
        "(`resize_kernel = \"uint8\"`); the naive server uses PIL and v1 transforms.")  # fmt: skip
    for spec in report.models:
        add(f"- **{spec.arch}** node `{spec.node}`, {spec.weights_label}.")
    add(f"- **layertap**: `layertap serve` subprocess, default settings"
        f"{' plus ' + ' '.join(a.layertap_arg) if a.layertap_arg else ''}"
        f"{' and model keys ' + ', '.join(a.layertap_model_key) if a.layertap_model_key else ''}"
        "; client "
        "`AsyncFeatureClient` with default settings, one channel.")  # fmt: skip
    add(f"- **naive gRPC**: bench/naive_server.py, `grpc.server(ThreadPoolExecutor("
        f"{a.naive_threads}))`, PIL + torchvision transforms, one forward per request with a "
        "forward hook; same client as layertap (it speaks the same Extract message).")  # fmt: skip
    add("- **LitServe**: bench/litserve_app.py, dynamic batching, 1 inference worker, 1 API "
        "server; JSON with base64 JPEG in, base64 float32 out; HTTP/1.1 keep-alive, one "
        "connection per in-flight request.")  # fmt: skip
    add(f"- Each point: {a.warmup_s:g} s warm-up then {a.seconds_s:g} s measured; closed loop "
        "with N requests in flight. CPU ms/image: CPU time of the server's process tree, and "
        "of this benchmark process (the client), per completed image.")  # fmt: skip
    add("")
    add("## Targets (issue: batching engine and performance)")
    add("")
    add("| target | model | measured (layertap vs peer) | required | result |")
    add("|---|---|---|---|---|")
    for t in targets:
        add(f"| {t.what} | {t.model} | {t.measured} | {t.required} | **{t.verdict}** |")
    add("")
    add("The targets are stated for the 2-core CPU with client and server sharing it. LitServe's "
        "throughput and c=1 p50 are its best over the final run and the tuning sweep; its p99 is "
        "the final run's (sweep points are too short for a p99).")  # fmt: skip
    add("")
    for spec in report.models:
        m = spec.arch
        add(f"## {m} (`{spec.node}`): throughput and latency")
        add("")
        add("| system | in flight | images/s | p50 ms | p99 ms | errors | server CPU ms/img "
            "| client CPU ms/img | config |")  # fmt: skip
        add("|---|---|---|---|---|---|---|---|---|")
        for label, b1_label, sweeps, batch1 in (
            ("in-process", "in-process batch-1 latency", report.inprocess, report.batch1),
            (
                "in-process, folded",
                "in-process, folded, batch-1 latency",
                report.inprocess_folded,
                report.batch1_folded,
            ),
        ):
            sweep = sweeps.get(m, [])
            if sweep:
                best = max(sweep, key=lambda p: p.images_per_s)
                add(f"| {label} (best batch) | – | {fmt(best.images_per_s)} | – | – | 0 "
                    f"| {fmt(best.server_cpu_ms)} | – | {best.config} |")  # fmt: skip
            b1 = batch1.get(m)
            if b1:
                add(f"| {b1_label} | 1 | {fmt(b1.images_per_s)} | {fmt(b1.p50_ms)} "
                    f"| {fmt(b1.p99_ms)} | 0 | – | – | {b1.config} |")  # fmt: skip
        for system in ("layertap", "naive gRPC", "LitServe"):
            for p in sorted(
                (p for p in report.points if p.system == system and p.model == m),
                key=lambda p: p.concurrency,
            ):
                add(f"| {system} | {p.concurrency} | {fmt(p.images_per_s)} | {fmt(p.p50_ms)} "
                    f"| {fmt(p.p99_ms)} | {p.errors} | {fmt(p.server_cpu_ms)} "
                    f"| {fmt(p.client_cpu_ms)} | {p.config} |")  # fmt: skip
        add("")
        for label, sweeps in (("", report.inprocess), (", folded", report.inprocess_folded)):
            if sweeps.get(m):
                add(f"In-process batch sweep{label} ({m}): "
                    + ", ".join(f"{p.config}: {fmt(p.images_per_s)}" for p in sweeps[m])
                    + " images/s.")  # fmt: skip
                add("")
        ls_sweep = report.litserve_sweep.get(m, [])
        if ls_sweep:
            add(f"LitServe tuning sweep ({m}, {a.sweep_seconds_s:g} s per point; chosen: "
                f"{report.litserve_best.get(m, '–')}):")  # fmt: skip
            add("")
            add("| config | in flight | images/s | p50 ms | p99 ms |")
            add("|---|---|---|---|---|")
            for p in ls_sweep:
                add(f"| {p.config} | {p.concurrency} | {fmt(p.images_per_s)} | {fmt(p.p50_ms)} "
                    f"| {fmt(p.p99_ms)} |")  # fmt: skip
            add("")
        lt = sorted(
            (p for p in report.points if p.system == "layertap" and p.model == m),
            key=lambda p: p.concurrency,
        )
        if lt:
            add(f"Where a layertap request's time goes ({m}): means of the server's own "
                "histograms over the point (warm-up included), and, last column, the client's "
                "mean latency minus the server's `Timings.total_ms` of the same responses "
                "(gRPC transport + client work):")  # fmt: skip
            add("")
            add("| in flight | mean batch | forwards/s | queue ms/img | decode ms/img "
                "| compute ms/batch | encode ms/req | server ms/req | client p50/mean ms "
                "| client − server ms |")  # fmt: skip
            add("|---|---|---|---|---|---|---|---|---|---|")
            for p in lt:
                e = p.extra
                fwd = e.get("forwards_per_s", float("nan"))
                add(f"| {p.concurrency} | {fmt(e.get('mean_batch'), 2)} | {fmt(fwd)} "
                    f"| {fmt(e.get('queue_ms'))} | {fmt(e.get('decode_ms'))} "
                    f"| {fmt(e.get('compute_ms'))} | {fmt(e.get('encode_ms'), 2)} "
                    f"| {fmt(e.get('server_request_ms'))} | {fmt(p.p50_ms)}/{fmt(p.mean_ms)} "
                    f"| {fmt(p.mean_ms - e.get('t_total_ms', float('nan')))} |")  # fmt: skip
            add("")
    mem = report.memory
    add("## Memory: extractor cache")
    add("")
    if mem:
        add(f"layertap server with {mem['model']} only; RSS from /proc/<pid>/status after "
            f"bursts of {mem['burst']} concurrent requests per node set (batches up to "
            f"max_batch_size; the 1-set state after 3 bursts, the {len(mem['sets'])}-set state "
            f"after {mem['passes']} pass(es) over all sets), GeM outputs.")  # fmt: skip
        add("")
        add("| state | node sets requested | extractors cached | VmRSS MiB | VmHWM MiB "
            + ("| CUDA allocated MiB | nvidia-smi MiB " if "cuda_allocated" in mem["one"] else "")
            + "|")  # fmt: skip
        add("|---|---|---|---|---|" + ("---|---|" if "cuda_allocated" in mem["one"] else ""))
        for label, key, n in (
            ("ready (warm-up only)", "ready", 0),
            ("1 node set", "one", 1),
            (f"{len(mem['sets'])} node sets", "twenty", len(mem["sets"])),
        ):
            s = mem[key]
            row = (f"| {label} | {n} | {s['cache_entries']:.0f} | {s['rss'] / 2**20:.0f} "
                   f"| {s['hwm'] / 2**20:.0f} |")  # fmt: skip
            if "cuda_allocated" in s:
                row += f" {s['cuda_allocated'] / 2**20:.0f} | {s['cuda_nvidia_smi'] / 2**20:.0f} |"
            add(row)
        add("")
        add(f"Ratio {len(mem['sets'])} / 1: **{mem['ratio']:.3f}×** (target ≤ 1.1×). Node sets: "
            + "; ".join("`" + ",".join(s) + "`" for s in mem["sets"]) + ".")  # fmt: skip
    else:
        add("Not measured in this run.")
    add("")
    add("## Mixed traffic: different node sets of one model")
    add("")
    if report.mixed:
        first = report.mixed[0]
        add(f"{first['clients']} clients, each with {first['inflight']} requests in flight, "
            f"each its own node set of {report.memory.get('model', a.aux_model.split(':')[0])} "
            f"({'; '.join('`' + s + '`' for s in first['node_sets'])}), GeM outputs.")  # fmt: skip
        add("")
        add("| forward sharing | images/s | p50 ms | p99 ms | forwards run | images per forward "
            "| errors |")  # fmt: skip
        add("|---|---|---|---|---|---|---|")
        for row in report.mixed:
            p = row["point"]
            add(f"| {row['share']} | {fmt(p.images_per_s)} | {fmt(p.p50_ms)} | {fmt(p.p99_ms)} "
                f"| {p.extra.get('forwards', 0):.0f} | {fmt(p.extra.get('mean_batch'), 2)} "
                f"| {p.errors} |")  # fmt: skip
    else:
        add("Not measured in this run.")
    add("")
    add("## GPU")
    add("")
    if a.device.startswith("cuda"):
        add("This run was on CUDA: every table above is GPU figures (the CPU targets are "
            "reported for information).")  # fmt: skip
    else:
        add("Not measured here: no GPU was available to this run. Where CUDA exists, fill it "
            "with `.venv/bin/python bench/compare.py --device cuda --out docs/BENCHMARKS_GPU.md`; "
            "servers then run on `cuda`, the memory table adds CUDA memory (the server's "
            "`layertap_cuda_memory_allocated_bytes` and nvidia-smi per process).")  # fmt: skip
    add("")
    if report.notes:
        add("## Notes")
        add("")
        for note in report.notes:
            add(f"- {note}")
        add("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main
ANALYSIS_START, ANALYSIS_END = "<!-- analysis: kept by bench/compare.py -->", "<!-- /analysis -->"


def kept_analysis(previous: str) -> str:
    """A hand-written block between the analysis markers survives regeneration of the report."""
    start, end = previous.find(ANALYSIS_START), previous.find(ANALYSIS_END)
    if start < 0 or end < start:
        return ""
    return previous[start : end + len(ANALYSIS_END)]


async def run(args: argparse.Namespace) -> int:
    cfg = dict(QUICK if args.quick else FULL)
    for key, value in (("seconds", args.seconds), ("warmup", args.warmup)):
        if value is not None:
            cfg[key] = value
    if args.concurrency:
        cfg["concurrency"] = tuple(int(c) for c in args.concurrency.split(","))
    if args.batch_sizes:
        cfg["batch_sizes"] = tuple(int(c) for c in args.batch_sizes.split(","))
    if args.node_sets:
        cfg["node_sets"] = args.node_sets
    if args.seconds is not None:
        cfg["sweep_seconds"] = min(cfg["sweep_seconds"], max(1.0, args.seconds / 2))
    args.seconds_s, args.warmup_s, args.sweep_seconds_s = (
        cfg["seconds"], cfg["warmup"], cfg["sweep_seconds"],
    )  # fmt: skip
    systems = set(args.systems.split(",")) - {"none", ""}
    unknown = systems - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown --systems {sorted(unknown)}; known: {SYSTEMS}")
    report = Report(
        args, "quick" if args.quick else "full",
        datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"), loadavg(),
    )  # fmt: skip
    if "litserve" in systems:
        import importlib.util

        if importlib.util.find_spec("litserve") is None:
            raise SystemExit(
                "LitServe is not installed: .venv/bin/pip install -e '.[bench]' "
                "(or leave it out with --systems inprocess,layertap,naive)"
            )
    models = args.models or ",".join(DEFAULT_MODELS[:1] if args.quick else DEFAULT_MODELS)
    report.models = [parse_model(m) for m in models.split(",")]
    jpegs = [data for _, data in photos()]
    log(f"{len(jpegs)} JPEG photos, {sum(map(len, jpegs)) // 1024} KiB; machine: "
        f"{machine_line(args.device)}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="layertap-bench-") as tmp:
        logdir = Path(tmp)
        for spec in report.models:
            log(f"{spec.arch} ({spec.node}, {spec.weights_label})")
            if "inprocess" in systems:
                sweep, b1 = run_inprocess(
                    spec, jpegs, args.device, cfg["batch_sizes"], cfg["seconds"] / 2
                )
                report.inprocess[spec.arch], report.batch1[spec.arch] = sweep, b1
                sweep, b1 = run_inprocess(
                    spec, jpegs, args.device, cfg["batch_sizes"], cfg["seconds"] / 2, fold=True
                )
                report.inprocess_folded[spec.arch], report.batch1_folded[spec.arch] = sweep, b1
            if "layertap" in systems:
                await phase_layertap(report, spec, jpegs, cfg, logdir)
            if "naive" in systems:
                await phase_naive(report, spec, jpegs, cfg, logdir)
            if "litserve" in systems:
                await phase_litserve(report, spec, jpegs, cfg, logdir)
        if not args.skip_memory or not args.skip_mixed:
            aux = parse_model(args.aux_model, allow_weights=False)
            if not args.skip_memory:
                log(f"memory: {aux.arch}, {cfg['node_sets']} node sets")
                await phase_memory(report, aux, jpegs, cfg, logdir)
            if not args.skip_mixed:
                log(f"mixed traffic: {aux.arch}, {MIXED_CLIENTS} clients")
                await phase_mixed(report, aux, jpegs, cfg, logdir)
    report.load_end = loadavg()
    targets = evaluate(report)
    text = render(report, targets)
    if args.out:
        out = Path(args.out)
        kept = kept_analysis(out.read_text() if out.is_file() else "")
        out.write_text(text + "\n" + (f"\n{kept}\n" if kept else ""))
        log(f"wrote {args.out}")
    else:
        print(text)
    print()
    for t in targets:
        print(f"TARGET {t.verdict}: {t.model}: {t.what}: {t.measured} (required {t.required})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description="layertap vs in-process, a naive gRPC server and LitServe (see docstring)."
    )
    parser.add_argument("--out", help="write the Markdown report here (default: print it)")
    parser.add_argument("--quick", action="store_true", help="short smoke run (noisy figures)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (all systems)")
    parser.add_argument(
        "--models",
        help="arch:node,... torchvision names (default: mobilenet_v2:features.18,resnet50:layer4; "
        "--quick: mobilenet_v2 only)",
    )
    parser.add_argument(
        "--aux-model", default="resnet50:layer4", help="model of the memory and mixed phases"
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="subset of " + ",".join(SYSTEMS)
    )
    parser.add_argument("--concurrency", help="comma list of in-flight requests (e.g. 1,4,16,64)")
    parser.add_argument("--batch-sizes", help="in-process batch sweep, comma list")
    parser.add_argument("--seconds", type=float, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per point")
    parser.add_argument("--node-sets", type=int, help="node sets of the memory phase (20)")
    parser.add_argument("--naive-threads", type=int, default=8, help="naive server's threads")
    parser.add_argument(
        "--mixed-inflight", type=int, default=4, help="requests in flight per mixed client"
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-mixed", action="store_true")
    parser.add_argument(
        "--layertap-arg",
        action="append",
        default=[],
        help="extra `layertap serve` flag, repeatable (e.g. --layertap-arg=--max-wait-ms=5)",
    )
    parser.add_argument(
        "--layertap-env",
        action="append",
        default=[],
        help="KEY=VALUE environment for layertap servers, repeatable (e.g. MALLOC_ARENA_MAX=2)",
    )
    parser.add_argument(
        "--layertap-model-key",
        action="append",
        default=[],
        help="KEY=TOML added to every layertap [[models]] entry, repeatable "
        "(e.g. channels_last=true)",
    )
    args = parser.parse_args(argv)
    args.argv = argv
    ENV_ARGS[:] = args.layertap_env
    MODEL_KEYS[:] = [" = ".join(kv.split("=", 1)) for kv in args.layertap_model_key]
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
