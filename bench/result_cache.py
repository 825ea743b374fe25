"""The result cache's throughput (issue 18: "repeat images cost nothing", target >= 1.8x at a
50 % repeat rate): the same stream of one-image Extract calls against `layertap serve` with the
cache off and on.

Run: `.venv/bin/python -m bench.result_cache [--requests 480] [--concurrency 16] [--rounds 2]`.
Each round starts a fresh server per mode (mobilenet_v2 with its ImageNet weights IMAGENET1K_V1,
as the default config serves it; CPU), `result_cache_bytes` 0 and 256 MiB, and sends it:

- a warm-up of `--concurrency * 4` new images (not timed), then
- `--requests` timed calls from `--concurrency` closed-loop callers, half of them new images and
  half (in random order, in pairs) an image first sent at least `4 * concurrency` calls
  earlier, so a repeat's first answer is back and its hit is a real one.

Images are real photos (bench/inputs.py), each new one a different random crop re-encoded as
JPEG; a call asks for features.18 GeM-pooled and L2-normalised. Prints the machine, the load
average, each run's images per second and p50 latency, the server's hit and miss counts, and
whether every repeated answer was byte-identical to the image's first. Client and server share
the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a file: import the bench package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import grpc

from bench.inputs import photos
from bench.machine import loadavg, machine_line
from bench.metrics import metric, scrape
from bench.processes import Proc, free_port, wait_until
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

MODEL = "mobilenet_v2"
NODE = "features.18"
CACHE_BYTES = 256 << 20
OUTPUT = pb.OutputOptions(pool=pb.POOLING_GEM, normalize=True)


def crops(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEGs: random crops (70-100 % of each side) of the real photos."""
    from PIL import Image

    rng = random.Random(seed)
    sources = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in photos()]
    out = []
    for index in range(count):
        image = sources[index % len(sources)]
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
        buf = io.BytesIO()
        image.crop((x, y, x + cw, y + ch)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def stream(warmup: int, requests: int, lag: int, seed: int = 0) -> list[int]:
    """Image indices to send: `warmup` new ones, then `requests` of which half are new and
    half repeat an image first sent at least `lag` calls earlier (one of each per pair)."""
    rng = random.Random(seed)
    order = list(range(warmup))
    first_sent: list[int] = list(range(warmup))  # image index -> position of its first call
    for _ in range(requests // 2):
        for new in rng.sample((True, False), 2):
            position = len(order)
            if new:
                first_sent.append(position)
                order.append(len(first_sent) - 1)
            else:
                old = [i for i, p in enumerate(first_sent) if p <= position - lag]
                order.append(rng.choice(old))
    return order


@dataclass
class Run:
    mode: str
    images_per_s: float
    p50_ms: float
    hits: float
    misses: float
    computed: float
    identical: int
    repeats: int
    load: str


def serve(cache_bytes: int, logdir: Path) -> tuple[Proc, str, str]:
    """`layertap serve` with mobilenet_v2 and the cache size; (process, target, metrics URL)."""
    port, metrics_port = free_port(), free_port()
    config = logdir / f"result-cache-{port}.toml"
    config.write_text(
        "[server]\n"
        f'host = "127.0.0.1"\nport = {port}\nmetrics_port = {metrics_port}\n'
        f'log_level = "WARNING"\nshutdown_delay_s = 0\nresult_cache_bytes = {cache_bytes}\n\n'
        f'[[models]]\nname = "{MODEL}"\narch = "{MODEL}"\nweights = "IMAGENET1K_V1"\n'
        'compile = ""\n'  # eager: no compilation (compile = "auto") competing for the cores
    )
    cmd = [sys.executable, "-m", "layertap.client", "serve", "--config", str(config)]
    proc = Proc(f"layertap-{port}", [*cmd, "--device", "cpu"], logdir)
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.FeatureServiceStub(channel)

    def ready() -> bool:
        models = stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        return bool(models) and all(m.ready for m in models)

    try:
        wait_until(ready, proc, 600, "layertap")
    except BaseException:
        proc.stop()
        raise
    finally:
        channel.close()
    return proc, target, f"http://127.0.0.1:{metrics_port}/metrics"


async def drive(
    target: str,
    jpegs: list[bytes],
    order: list[int],
    warmup: int,
    concurrency: int,
    between: Callable[[], object],
) -> tuple[float, list[float], dict[int, list[bytes]]]:
    """Send `order` (the first `warmup` untimed, then `between()`) from `concurrency`
    callers; images per second of the timed part, its latencies, and every answer's bytes by
    image."""
    answers: dict[int, list[bytes]] = {}
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)

        async def call(image: int, timed: bool) -> None:
            request = pb.ExtractRequest(
                model=MODEL, images=[pb.Image(encoded=jpegs[image])], nodes=[NODE], output=OUTPUT
            )
            started = time.perf_counter()
            response = await stub.Extract(request, timeout=120)
            if timed:
                latencies.append(time.perf_counter() - started)
            answers.setdefault(image, []).append(response.results[0].outputs[0].tensor.data)

        async def caller(queue: list[int], timed: bool) -> None:
            while queue:
                await call(queue.pop(0), timed)

        warm = order[:warmup]
        await asyncio.gather(*(caller(warm, False) for _ in range(concurrency)))
        between()
        timed = order[warmup:]
        started = time.perf_counter()
        await asyncio.gather(*(caller(timed, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(order[warmup:]) / elapsed, latencies, answers


def measure(mode: str, jpegs: list[bytes], order: list[int], args: argparse.Namespace) -> Run:
    warmup = args.concurrency * 4
    with tempfile.TemporaryDirectory() as logs:
        proc, target, metrics_url = serve(CACHE_BYTES if mode == "on" else 0, Path(logs))
        try:
            label = {"model": MODEL}
            scrapes = []
            rate, latencies, answers = asyncio.run(
                drive(
                    target,
                    jpegs,
                    order,
                    warmup,
                    args.concurrency,
                    lambda: scrapes.append(scrape(metrics_url)),
                )
            )
            before, after = scrapes[0], scrape(metrics_url)
            load = loadavg()
        finally:
            proc.stop()

    def delta(name: str) -> float:
        return metric(after, name, **label) - metric(before, name, **label)

    repeats = [a for a in answers.values() if len(a) > 1]
    return Run(
        mode,
        rate,
        1000 * statistics.median(latencies),
        delta("layertap_result_cache_hits_total"),
        delta("layertap_result_cache_misses_total"),
        delta("layertap_images_total"),
        sum(all(x == a[0] for x in a[1:]) for a in repeats),
        len(repeats),
        load,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=480, help="timed calls per run")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs, interleaved")
    args = parser.parse_args()
    lag = 4 * args.concurrency
    order = stream(args.concurrency * 4, args.requests, lag)
    jpegs = crops(max(order) + 1)
    timed = order[args.concurrency * 4 :]
    repeats = sum(order.index(i) < args.concurrency * 4 + k for k, i in enumerate(timed))
    print(f"machine: {machine_line('cpu')}")
    print(f"load average before: {loadavg()}")
    print(
        f"{len(timed)} timed one-image calls ({repeats} repeats of an image first sent at least "
        f"{lag} calls earlier, {len(jpegs)} distinct JPEGs), {args.concurrency} in flight"
    )
    runs: list[Run] = []
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            run = measure(mode, jpegs, order, args)
            runs.append(run)
            print(
                f"cache {run.mode}: {run.images_per_s:.1f} images/s, p50 {run.p50_ms:.0f} ms, "
                f"hits {run.hits:.0f}, misses {run.misses:.0f}, images computed "
                f"{run.computed:.0f}, repeated answers identical {run.identical}/{run.repeats}, "
                f"load {run.load}",
                flush=True,
            )
    off = [r.images_per_s for r in runs if r.mode == "off"]
    on = [r.images_per_s for r in runs if r.mode == "on"]
    ratios = [b / a for a, b in zip(off, on, strict=True)]
    print(
        f"speed-up per round: {', '.join(f'{x:.2f}x' for x in ratios)}; medians "
        f"{statistics.median(on):.1f} vs {statistics.median(off):.1f} images/s = "
        f"{statistics.median(on) / statistics.median(off):.2f}x"
    )
    print(f"load average after: {loadavg()}")


if __name__ == "__main__":
    main()
