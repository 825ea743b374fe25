"""How long DescribeModel's work takes: the eval-graph trace plus fake-tensor shape propagation.

Run: `.venv/bin/python bench/describe_bench.py [arch ...]` (default: vit_h_14 resnet50 swin_t
convnext_large regnet_y_128gf). Models are built with random init on the CPU first (not timed);
then build_catalog, exactly what the server runs at load time to answer DescribeModel, is timed
over 3 runs. Prints a Markdown table with the machine it ran on.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch
import torchvision

from layertap.server.catalog import build_catalog
from layertap.server.settings import ModelConfig
from layertap.server.sources import build_model

DEFAULT = ["vit_h_14", "resnet50", "swin_t", "convnext_large", "regnet_y_128gf"]


def main(archs: list[str]) -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, {platform.python_version()}"
    )
    print("| model | params (M) | nodes | describe, median of 3 (s) | build model (s) |")
    print("|---|---|---|---|---|")
    for arch in archs:
        started = time.perf_counter()
        loaded = build_model(ModelConfig(name=arch, arch=arch, weights="none", allow_random=True))
        build_s = time.perf_counter() - started
        times = []
        for _ in range(3):
            started = time.perf_counter()
            catalog = build_catalog(loaded.module, loaded.preprocessing.crop_size)
            times.append(time.perf_counter() - started)
        params = sum(p.numel() for p in loaded.module.parameters()) / 1e6
        print(
            f"| {arch} | {params:.0f} | {len(catalog.nodes)} | {statistics.median(times):.2f} "
            f"| {build_s:.1f} |"
        )
        del loaded, catalog


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
