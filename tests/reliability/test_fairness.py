"""Fairness between clients (issue 17): one client flooding at concurrency 256 (two images a
request), another at concurrency 4 (one image), against a real `layertap serve` process on
loopback.

What the server does about it (server/fairness.py, server/batcher.py, server/queue_room.py,
server/fair_pool.py): each client (its token, else its connection) may hold its
`client_queue_share` of the batch queue, more while the others hold little, but never the
share kept free for a newcomer (384 of 512 images by default: the flood's 512 do not fit);
past that it waits `client_wait_ms` for its own images, then gets RESOURCE_EXHAUSTED with the
retryable trailer. Within what it holds, weighted fair queuing orders the batcher, and decodes
take turns between clients.

The test pins counts, never a speed: the flooder is refused (RESOURCE_EXHAUSTED, retryable) while
every call of the other client succeeds, and the other client still completes round trips while
the flood runs. The latency figures (the victim's p50 alone and under the flood, the flooder's
throughput) are what `bench/reliability_figures.py` writes to docs/RELIABILITY.md;
`run_fairness` is the scenario both run.

The flooder runs in a process of its own, so its client-side work does not stall the victim's
event loop (on one machine they still share the cores with the server).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import encode, photo
from test_soak import ServerProcess, serving

from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

pytestmark = pytest.mark.soak

RETRYABLE = ("layertap-retryable", "true")
CONFIG = """
[server]
warmup = true

[[models]]
name = "r18"
arch = "resnet18"
weights = "none"
allow_random = true
input_size = [128, 128]
"""


def image() -> bytes:
    return encode(photo("astronaut")[::2, ::2], "JPEG")


def request(model: str, data: bytes, images: int = 1) -> pb.ExtractRequest:
    return pb.ExtractRequest(
        model=model,
        images=[pb.Image(encoded=data)] * images,
        nodes=["layer4"],
        output=pb.OutputOptions(pool=pb.POOLING_AVG),
    )


async def closed_loop(
    target: str, model: str, concurrency: int, seconds: float, backoff_s: float, images: int = 1
) -> dict[str, Any]:
    """`concurrency` callers on one channel (one connection: one client), each sending the next
    call when the last is answered (after `backoff_s` when it was refused); returns the OK
    latencies and every status seen."""
    data = image()
    latencies: list[float] = []
    timings: list[tuple[float, float, float, float]] = []
    codes: Counter[str] = Counter()
    retryable = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        message = request(model, data, images)
        stop = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal retryable
            while time.monotonic() < stop:
                started = time.perf_counter()
                call = stub.Extract(message, timeout=30)
                try:
                    answer = await call
                    latencies.append(time.perf_counter() - started)
                    t = answer.metadata.timings
                    timings.append((t.queue_ms, t.decode_ms, t.compute_ms, t.total_ms))
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                    trailer = tuple(error.trailing_metadata() or ())
                    retryable += RETRYABLE in trailer
                    await asyncio.sleep(backoff_s)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    server_ms = [round(statistics.median(column), 1) for column in zip(*timings, strict=True)]
    return {
        "latencies": latencies,
        "codes": dict(codes),
        "retryable": retryable,
        "server_p50_ms": dict(
            zip(("queue", "decode", "compute", "total"), server_ms, strict=False)
        ),
    }


def _flood(
    target: str, model: str, concurrency: int, seconds: float, backoff_s: float, out: Any
) -> None:
    out.put(asyncio.run(closed_loop(target, model, concurrency, seconds, backoff_s, images=2)))


def run_fairness(
    target: str,
    model: str,
    seconds: float = 10.0,
    flood: int = 256,
    victim: int = 4,
    flood_backoff_s: float = 0.0,
) -> dict[str, Any]:
    """The victim alone for `seconds`, then the victim beside the flooder for `seconds` (the
    flooder starts 2 s earlier, so the queue is full when the victim's window starts). The
    flooder retries a refused call after `flood_backoff_s` (0: at once, as an attacker would)."""
    solo = asyncio.run(closed_loop(target, model, victim, seconds, backoff_s=0.01))
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    flooder = context.Process(
        target=_flood, args=(target, model, flood, seconds + 4, flood_backoff_s, out)
    )
    flooder.start()
    try:
        time.sleep(2.0)
        beside = asyncio.run(closed_loop(target, model, victim, seconds, backoff_s=0.01))
        flooded = out.get(timeout=seconds + 120)
    finally:
        flooder.join(60)
        if flooder.is_alive():
            flooder.kill()

    def p50_ms(values: list[float]) -> float | None:
        return round(1000 * statistics.median(values), 1) if values else None

    figures = {
        "seconds": seconds,
        "victim_solo": {
            "codes": solo["codes"],
            "p50_ms": p50_ms(solo["latencies"]),
            "server_p50_ms": solo["server_p50_ms"],
        },
        "victim_flooded": {
            "codes": beside["codes"],
            "p50_ms": p50_ms(beside["latencies"]),
            "server_p50_ms": beside["server_p50_ms"],
        },
        "flooder": {
            "codes": flooded["codes"],
            "retryable": flooded["retryable"],
            "p50_ms": p50_ms(flooded["latencies"]),
            "ok_per_s": round(flooded["codes"].get("OK", 0) / (seconds + 4), 1),
        },
    }
    solo_p50, flooded_p50 = figures["victim_solo"]["p50_ms"], figures["victim_flooded"]["p50_ms"]
    if solo_p50 and flooded_p50:
        figures["victim_p50_ratio"] = round(flooded_p50 / solo_p50, 2)
    return figures


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(tmp_path_factory.mktemp("fairness"), CONFIG) as process:
        yield process


def test_a_flooding_client_is_refused_while_another_is_served(
    server: ServerProcess, record_property: Any
) -> None:
    figures = run_fairness(server.target, "r18", seconds=6.0)
    print("FAIRNESS_RESULT", figures)
    record_property("figures", repr(figures))
    flooder, victim = figures["flooder"], figures["victim_flooded"]
    # the flooder held its share of the queue and was refused past it, retryably
    assert flooder["codes"].get("RESOURCE_EXHAUSTED", 0) > 0, figures
    assert flooder["retryable"] == flooder["codes"]["RESOURCE_EXHAUSTED"], figures
    assert flooder["codes"].get("OK", 0) > 0, figures  # refused past its share, not starved
    # the other client was never refused and kept completing calls beside the flood
    assert set(victim["codes"]) == {"OK"}, figures
    assert victim["codes"]["OK"] >= 8, figures
