"""Many node sets of one model on one layertap server: the extractor cache's memory (RSS with 1
and with 20 node sets cached) and mixed traffic (clients with different node sets, with and
without forward sharing)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import MIXED_CLIENTS
from bench.inputs import ModelSpec
from bench.loadgen import Call, measure
from bench.machine import cuda_memory_by_pid, rss_bytes
from bench.metrics import metric, scrape
from bench.processes import layertap_server, layertap_supports
from bench.results import Report, log


def spaced_node_sets(nodes: Sequence[Any], main: str, count: int) -> list[list[str]]:
    """`main` first, then count-1 single nodes spread evenly over the model's 4-D nodes."""
    names = [n.name for n in nodes if n.layout in ("NCHW", "NHWC") and n.name != main]
    if count - 1 > len(names):
        raise RuntimeError(f"only {len(names)} candidate nodes for {count} node sets")
    picks = np.linspace(0, len(names) - 1, count - 1).round().astype(int)
    return [[main]] + [[names[i]] for i in dict.fromkeys(int(i) for i in picks)]


async def phase_memory(report: Report, spec: ModelSpec, jpegs: list[bytes], logdir: Path) -> None:
    from layertap.client import AsyncFeatureClient

    cfg, timing = report.config, report.config.timing
    device = cfg.device
    with layertap_server([spec], device, logdir, cfg.layertap) as (proc, target, murl):
        async with AsyncFeatureClient(target) as client:
            desc = await client.describe(spec.arch)
            main = (await client.extract(jpegs[0], model=spec.arch, nodes=spec.node)).nodes
            main_full = next(iter(main.values()))
            sets = spaced_node_sets(desc.nodes, main_full, timing.node_sets)
            burst = timing.memory_burst  # concurrent requests per round: fills whole batches

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
                cuda = metric(m, "layertap_cuda_memory_allocated_bytes", device=device)
                if device.startswith("cuda"):
                    snap["cuda_allocated"] = cuda
                    snap["cuda_nvidia_smi"] = cuda_memory_by_pid(proc.pid) or float("nan")
                return snap

            ready = snapshot()
            await rounds(sets[0], 3)
            one = snapshot()
            for nodes in sets[1:]:
                await rounds(nodes, 1)
            for _ in range(timing.memory_passes - 1):  # every set again: all cached and used
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
        "burst": timing.memory_burst,
        "passes": timing.memory_passes,
    }
    log(
        f"  memory {spec.arch}: RSS {one['rss'] / 2**20:.0f} MiB with 1 node set, "
        f"{twenty['rss'] / 2**20:.0f} MiB with {len(sets)} ({report.memory['ratio']:.3f}x)"
    )


async def phase_mixed(report: Report, spec: ModelSpec, jpegs: list[bytes], logdir: Path) -> None:
    from layertap.client import AsyncFeatureClient

    cfg, timing = report.config, report.config.timing
    supported = layertap_supports("--share-forwards")
    modes: list[bool | None] = [True, False] if supported else [None]
    if not supported:
        report.notes.append(
            "This layertap has no `share_forwards` setting yet: mixed traffic was measured once, "
            "with the server's current behaviour (requests for different node sets of one model "
            "share a forward); rerun when the setting exists to get the 'no sharing' row."
        )
    for share in modes:
        extra = [] if share is None else ["--share-forwards", "true" if share else "false"]
        server = layertap_server([spec], cfg.device, logdir, cfg.layertap, extra)
        with server as (proc, target, murl):
            clients = [AsyncFeatureClient(target) for _ in range(MIXED_CLIENTS)]
            try:
                desc = await clients[0].describe(spec.arch)
                r = await clients[0].extract(jpegs[0], model=spec.arch, nodes=spec.node)
                sets = spaced_node_sets(desc.nodes, next(iter(r.nodes.values())), 7)
                chosen = [sets[0], sets[2], sets[4], sets[6]][:MIXED_CLIENTS]
                per_client = cfg.mixed_inflight

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
                    timing.warmup, timing.seconds, config=f"share_forwards {label}",
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
