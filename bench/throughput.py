"""Images per second through layertap, for sizing replicas (docs/DEPLOY.md).

Run: `.venv/bin/python bench/throughput.py [--seconds 15] [--device auto]` (or `python -m
bench.throughput`). Starts an in-process server on 127.0.0.1 with mobilenet_v2 and resnet50
(random init: timing does not depend on weights), then for each model sends real JPEG photos
(8 per request, GeM of the last stage) from 4 concurrent clients for the given time, after a
warm-up. Also times the in-process forward at the same batch size (no gRPC, no JPEG decode) as
a ceiling. Prints a Markdown table with the machine it ran on. Client and server share the
machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: import the bench package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from bench.inputs import photos
from layertap.client import AsyncFeatureClient
from layertap.server.app import create_server
from layertap.server.settings import ModelConfig, Settings

MODELS = {"mobilenet_v2": "features.18", "resnet50": "layer4"}
IMAGES_PER_REQUEST = 8
CONCURRENCY = 4


async def drive(target: str, model: str, node: str, seconds: float) -> tuple[float, list[float]]:
    jpegs = [data for _, data in photos(("astronaut", "chelsea", "coffee", "rocket"))]
    images = [jpegs[i % len(jpegs)] for i in range(IMAGES_PER_REQUEST)]
    latencies: list[float] = []
    async with AsyncFeatureClient(target, timeout=120) as client:
        for _ in range(3):  # warm-up
            await client.extract(images, model=model, nodes=node, pool="gem")
        stop = time.perf_counter() + seconds

        async def worker() -> int:
            done = 0
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await client.extract(images, model=model, nodes=node, pool="gem")
                latencies.append(time.perf_counter() - t)
                done += IMAGES_PER_REQUEST
            return done

        started = time.perf_counter()
        counts = await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    return sum(counts) / elapsed, latencies


def in_process(model: torch.nn.Module, seconds: float) -> float:
    x = torch.randn(IMAGES_PER_REQUEST, 3, 224, 224)
    with torch.inference_mode():
        model(x)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(x)
            n += IMAGES_PER_REQUEST
    return n / (time.perf_counter() - started)


async def main(seconds: float, device: str) -> None:
    settings = Settings(
        port=0,
        metrics=False,
        device=device,
        max_batch_size=IMAGES_PER_REQUEST,
        models=tuple(
            ModelConfig(name=m, arch=m, weights="none", allow_random=True) for m in MODELS
        ),
    )
    server, port = await create_server(settings)
    await server.start()
    await server.wait_ready()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, device {server.runtime.device}, "
        f"torch {torch.__version__}, {IMAGES_PER_REQUEST} JPEG images/request, "
        f"concurrency {CONCURRENCY}, {seconds:.0f} s per model"
    )
    print("| model | layertap images/s | p50 request (ms) | in-process forward images/s |")
    print("|---|---|---|---|")
    for model, node in MODELS.items():
        rate, lat = await drive(f"127.0.0.1:{port}", model, node, seconds)
        module = server.runtime.model(model).weights.module
        ceiling = await asyncio.get_running_loop().run_in_executor(
            server.runtime._executor, in_process, module, seconds / 2
        )
        print(f"| {model} | {rate:.1f} | {1000 * statistics.median(lat):.0f} | {ceiling:.1f} |")
    await server.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.device))
