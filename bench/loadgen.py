"""The load generator: a closed loop of N requests in flight on this process's event loop, the
gRPC and HTTP calls it sends, and one measured point made of a loop's responses."""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.machine import tree_cpu_seconds
from bench.metrics import scrape, stage_breakdown
from bench.results import Point, log, percentile

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


async def server_warmup(
    make_call: Callable[[int], Call], warmup: float, conns: Sequence[HttpConnection] = ()
) -> None:
    """Once per server start: a few seconds of load at several concurrencies, discarded, so
    every batch shape the points will see has run once (allocator, kernel caches)."""
    for c in (2, 5, 16):
        await closed_loop(make_call, c, 0.0, warmup / 2)
    close_all(conns)


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
        self.headers: dict[str, str] = {}

    async def post(self, path: str, body: bytes, extra_headers: str = "") -> bytes:
        """The response body (its headers in `self.headers`); `extra_headers`: more request
        header lines, each ending in CRLF."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n{extra_headers}"
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
            self.headers = headers
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


def close_all(conns: Sequence[HttpConnection]) -> None:
    for conn in conns:
        conn.close()


# ---------------------------------------------------------------------------------- points
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
