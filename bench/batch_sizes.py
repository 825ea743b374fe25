"""Which batch size is fastest per image on this machine: the numbers behind the CPU defaults of
`preferred_batch_size` and `max_batch_size` (server/settings.py, docs/OPERATIONS.md).

Run: `.venv/bin/python bench/batch_sizes.py [--model mobilenet_v2] [--seconds 2]
[--rounds 3] [--sizes 1,2,4,8,16] [--threads 0] [--channels-last]`.

Times the model's forward alone (no gRPC, no decode) under `torch.inference_mode()` on the CPU
with the model's real weights when cached (random init otherwise: timing does not depend on
weights), at 224x224: `--rounds` interleaved rounds over the batch sizes, each a warm-up then
repeated forwards for `--seconds`; the best round per size counts (a busy machine only ever
slows a round down). Prints a Markdown table with images/s and ms per image, and the fastest.

Measured on the 2-core development machine (x86_64, torch 2.14.1+cu130 running on the
CPU, 2 intra-op threads, shared with other work: read the ranking, not the third digit),
mobilenet_v2 with its real ImageNet weights, `--seconds 2 --rounds 4`:

| batch | images/s (best of rounds) | ms/image |
|---|---|---|
| 1 | 65.8 | 15.2 |
| 2 | 87.0 | 11.5 |
| 4 | 93.7 | 10.7 |
| 8 | 79.8 | 12.5 |
| 16 | 55.0 | 18.2 |

Batch 4 is fastest per image (of two earlier single-round runs, one ranked 4 first, the other
2); 8 is 10-15 % slower per image and 16 much slower (activations no longer fit the caches).
Hence `preferred_batch_size` 4: once 4 images are queued a batch stops waiting. `max_batch_size`
stays 8 (the GPU-friendly default): on a CPU-only deployment set it to 4 as well.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from layertap.server.settings import ModelConfig
from layertap.server.sources import build_model


def build(model: str) -> torch.nn.Module:
    """The model through layertap's own offline loader: cached IMAGENET1K_V1 weights, else
    random init (never downloads)."""
    cfg = ModelConfig(name=model, arch=model, weights="IMAGENET1K_V1", allow_random=True)
    return build_model(cfg).module.eval()


def rate(module: torch.nn.Module, batch: int, seconds: float, channels_last: bool) -> float:
    x = torch.randn(batch, 3, 224, 224)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            module(x)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            module(x)
            n += batch
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--seconds", type=float, default=2.0, help="per size and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1,2,4,8,16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = build(args.model)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads, {args.model}, "
        f"channels_last={args.channels_last}, {args.rounds} rounds of {args.seconds:.0f} s per size"
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    rates: dict[int, float] = {}
    for _ in range(args.rounds):  # interleaved rounds, best of each: robust to a busy machine
        for size in sizes:
            r = rate(module, size, args.seconds, args.channels_last)
            rates[size] = max(rates.get(size, 0.0), r)
    print("| batch | images/s (best of rounds) | ms/image |")
    print("|---|---|---|")
    for size in sizes:
        print(f"| {size} | {rates[size]:.1f} | {1000 / rates[size]:.1f} |")
    best = max(rates, key=rates.__getitem__)
    print(f"fastest per image: batch {best}")


if __name__ == "__main__":
    main()
