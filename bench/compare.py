"""layertap side by side with its peers, on one machine, one image per request.

Run (full, about 10-15 minutes on a 2-core machine; writes the report):

    .venv/bin/python bench/compare.py --out docs/BENCHMARKS.md

(`python -m bench.compare` is the same.)
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

This file is only the entry point; the work is in the `bench` package: cli (flags, phase order),
config (the run's settings), inputs (photos, models), loadgen (closed loop, gRPC and HTTP calls,
points), processes (server subprocesses), systems and node_sets (the phases), metrics (layertap's
Prometheus endpoint), machine (CPU, memory, load), targets (verdicts) and report (Markdown).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file (python bench/compare.py): import the package from the
    # repository root instead of this folder, whose module names would shadow top-level ones
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
