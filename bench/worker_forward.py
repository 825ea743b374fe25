"""What a CPU forward costs on a server's worker thread, and the two process settings that
`layertap serve` applies for it (server/process.py). Not a test: a measurement.

Run: .venv/bin/python bench/worker_forward.py [--model mobilenet_v2 --node features.18]

Each variant runs in a fresh subprocess (glibc reads its malloc settings at start-up, libgomp
keeps thread teams for the process's life), variants interleaved over --rounds rounds, and
prints the median forward time per batch size:

- main:            the forward on the main thread, defaults (a benchmark loop);
- worker:          on a worker thread, main thread single-threaded (layertap's layout);
- worker+team:     on a worker thread after one 2-thread op on the main thread (a second
                   OpenMP team: libgomp's throttled barrier spin);
- worker+keep:     worker, with layertap's malloc thresholds (process.keep_freed_memory);
- +idle5:          worker+keep, the worker thread asleep 5 ms before each forward (a server
                   between requests at low load);
- +idle1:          the same with a 1 ms sleep (the cost is the sleep, not its length);
- +spin5:          worker+keep, the worker thread busy for those 5 ms instead;
- +team5:          worker+keep, both OpenMP threads busy for those 5 ms (a parallel op).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, statistics, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch, torchvision
from torchvision.models.feature_extraction import create_feature_extractor
variant, arch, node, sizes = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
threads = torch.get_num_threads()
if variant != "main":
    torch.set_num_threads(1)
if variant == "worker+team":
    torch.set_num_threads(threads)
    torch.ones(1 << 22).add_(1)  # one multi-threaded op: the main thread's OpenMP team
    torch.set_num_threads(1)
if variant.startswith("worker+keep"):
    from layertap.server.process import keep_freed_memory
    assert keep_freed_memory()
state = {}
def build():
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    state["fe"] = create_feature_extractor(model, {node: "feat"}).eval()
def bench(batch):
    x = torch.randn(batch, 3, 224, 224)
    busy = torch.ones(1 << 18)
    times = []
    with torch.inference_mode():
        for i in range(18):
            end = time.perf_counter() + 0.005
            if variant.endswith("+idle5"):
                time.sleep(0.005)
            elif variant.endswith("+idle1"):
                time.sleep(0.001)
            elif variant.endswith("+spin5"):
                while time.perf_counter() < end:
                    pass
            elif variant.endswith("+team5"):
                while time.perf_counter() < end:
                    busy.add_(1)  # above ATen's grain size: both threads of the team
            t = time.perf_counter()
            state["fe"](x)
            if i >= 3:
                times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000
if variant == "main":
    build()
    out = {b: bench(b) for b in sizes}
else:
    pool = ThreadPoolExecutor(1, initializer=lambda: torch.set_num_threads(threads))
    pool.submit(build).result()
    out = {b: pool.submit(bench, b).result() for b in sizes}
print(json.dumps(out))
"""

VARIANTS = (
    "main",
    "worker",
    "worker+team",
    "worker+keep",
    "worker+keep+idle5",
    "worker+keep+idle1",
    "worker+keep+spin5",
    "worker+keep+team5",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--node", default="features.18")
    parser.add_argument("--sizes", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, dict[int, list[float]]] = {v: {b: [] for b in sizes} for v in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, "-c", CHILD, variant, args.model, args.node, json.dumps(sizes)]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            for b, ms in json.loads(done.stdout.strip().splitlines()[-1]).items():
                results[variant][int(b)].append(ms)
            print(f"round {round_ + 1}: {variant} done", file=sys.stderr)
    print(f"{args.model} `{args.node}`, random init, median forward ms over {args.rounds} rounds")
    print("| variant | " + " | ".join(f"batch {b}" for b in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for variant in VARIANTS:
        cells = [f"{statistics.median(results[variant][b]):.1f}" for b in sizes]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
