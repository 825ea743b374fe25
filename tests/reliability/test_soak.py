"""Load and soak against a real `layertap serve` process on loopback (marker `soak`).

- `test_soak_mixed_load`: 10 s warm-up then 60 s at concurrency 64 over three models (resnet18
  at 96×96 and two tiny factory nets), ten node sets, raw/avg/max/gem pooling, float32/float16/
  bfloat16 outputs, 1-4 real photos (JPEG/PNG/WebP) a request, about 5 % of requests carrying a
  bad image. Every good request must come back OK with the shapes DescribeModel promises, every
  bad one INVALID_ARGUMENT, nothing else; the server's RSS may grow less than 5 % after the
  warm-up; the server's own request counters must equal what the clients saw (nothing lost);
  SIGTERM then exits 0.
- Overload (`overload_figures`): a queue of 16 images and 128 closed-loop clients on resnet18
  for a 4 s ramp and two 5 s windows. Requests get RESOURCE_EXHAUSTED while accepted ones
  still complete; RSS shows no trend from one window to the next; at concurrency 2 right after,
  everything is OK again.

Nothing here asserts a speed or a latency: on a shared runner those measure the neighbours.
"Under load" is shown by counts (round trips per client, forwards shared); the latencies
(accepted p99, refusals against a validation refusal, trends) are figures that
`bench/reliability_figures.py` writes to docs/RELIABILITY.md. That a queue-full refusal costs no
decode is pinned without timing in tests/reliability/test_queue_full.py.

The server runs in a subprocess so its RSS is its own (/proc/<pid>/status). Every loop is
bounded by time and every call by a deadline. `bench/reliability_figures.py` runs the same
scenarios outside pytest and prints the figures; here each test prints one parseable line,
`SOAK_RESULT {json}` / `OVERLOAD_RESULT {json}` (see it with `pytest -s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

pytestmark = pytest.mark.soak

TESTS_DIR = Path(__file__).resolve().parents[1]
ROOT = TESTS_DIR.parent
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
CALL_TIMEOUT_S = 30.0
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
POOLS = {"raw": pb.POOLING_RAW, "avg": pb.POOLING_AVG, "max": pb.POOLING_MAX, "gem": pb.POOLING_GEM}

MODELS_TOML = """
[[models]]
name = "r18"
arch = "resnet18"
weights = "none"
allow_random = true
input_size = [96, 96]

[[models]]
name = "tiny8"
factory = "factories:tiny_net"
kwargs = { width = 8 }
weights = "none"
allow_random = true
input_size = [64, 64]

[[models]]
name = "tiny16"
factory = "factories:tiny_net"
kwargs = { width = 16 }
weights = "none"
allow_random = true
input_size = [80, 80]
"""

# (model, nodes, pool, normalize, dtype): what the clients ask for, chosen uniformly
MIX: list[tuple[str, tuple[str, ...], str, bool, str]] = [
    ("r18", ("layer4",), "gem", True, "float32"),
    ("r18", ("layer2", "layer4"), "avg", False, "float32"),
    ("r18", ("layer1",), "raw", False, "float16"),
    ("r18", ("fc",), "raw", False, "float32"),
    ("r18", ("layer3",), "max", True, "bfloat16"),
    ("tiny8", ("stem",), "raw", False, "float32"),
    ("tiny8", ("pools",), "gem", True, "float32"),
    ("tiny8", ("head",), "raw", False, "float16"),
    ("tiny16", ("pools.2",), "avg", False, "float32"),
    ("tiny16", ("stem.1", "head"), "raw", False, "float32"),
]


# --- the server process --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(folder: Path, **server: object) -> Path:
    lines = ["[server]"] + [f"{k} = {json.dumps(v)}" for k, v in server.items()]
    path = folder / "layertap-soak.toml"
    path.write_text("\n".join(lines) + "\n" + MODELS_TOML)
    return path


class ServerProcess:
    """`python -m layertap.client.cli serve` on free loopback ports, with tests/ importable."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERTAP_")}
        env["LAYERTAP_HTTP_PORT"] = "0"  # never a fixed port in tests
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p
        )
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "layertap.client.cli", "serve",
                    "--config", str(config), "--host", "127.0.0.1",
                    "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                    "--log-level", "WARNING", "--log-format", "text",
                ],
                stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT,
            )  # fmt: skip

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.log_tail()}")
                try:
                    request = health_pb2.HealthCheckRequest(service="")
                    if health.Check(request, timeout=2).status == 1:  # SERVING
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"server never SERVING:\n{self.log_tail()}")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metrics(self) -> dict[tuple[str, str], float]:
        """Server-side Extract counts by (model, code), from /metrics."""
        counts: dict[tuple[str, str], float] = {}
        for sample in self._samples():
            labels = sample.labels
            if sample.name == "layertap_requests_total" and labels["method"] == "Extract":
                counts[(labels["model"], labels["code"])] = sample.value
        return counts

    def forwards(self) -> tuple[int, int]:
        """(forwards run, forwards of more than one image), summed over models, from the
        layertap_batch_size histogram on /metrics."""
        total = single = 0.0
        for sample in self._samples():
            if sample.name == "layertap_batch_size_count":
                total += sample.value
            elif sample.name == "layertap_batch_size_bucket" and float(sample.labels["le"]) == 1:
                single += sample.value
        return int(total), int(total - single)

    def _samples(self) -> list[Any]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return [s for family in text_string_to_metric_families(text) for s in family.samples]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (graceful drain); returns the exit code, killing only after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                return -9
        return int(self.proc.returncode)


@contextlib.contextmanager
def serving(folder: Path, config_text: str) -> Iterator[ServerProcess]:
    """A `layertap serve` process on `config_text` (written to `folder`), SERVING until the
    block ends; then SIGTERM, and it must exit 0."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "layertap.toml"
    config.write_text(config_text)
    process = ServerProcess(config, folder / "server.log")
    try:
        process.wait_serving()
        yield process
    finally:
        assert process.stop() == 0, process.log_tail()


# --- what the clients send -----------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    model: str
    nodes: tuple[str, ...]
    pool: str
    normalize: bool
    dtype: str
    shapes: dict[str, tuple[int, ...]]  # node -> expected per-image output shape


def build_cases(target: str) -> list[Case]:
    """The MIX with each output's shape from DescribeModel (raw: the node's shape; pooled: its
    channels)."""
    cases = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        catalog = {}
        for model in {m for m, *_ in MIX}:
            described = stub.DescribeModel(pb.DescribeModelRequest(model=model), timeout=60)
            catalog[model] = {n.name: (tuple(n.shape), n.layout) for n in described.nodes}
    for model, nodes, pool, normalize, dtype in MIX:
        shapes = {}
        names = list(catalog[model])
        for node in nodes:
            # a truncated name is the last node under that prefix (torchvision's rule)
            full = node if node in names else [n for n in names if n.startswith(node + ".")][-1]
            shape, layout = catalog[model][full]
            channels = {"NHWC": 3, "NLC": 2}.get(layout, 1)
            shapes[node] = tuple(shape[1:]) if pool == "raw" else (shape[channels],)
        cases.append(Case(model, nodes, pool, normalize, dtype, shapes))
    return cases


def good_images() -> list[bytes]:
    """Real photos (scikit-image's, shipped with the test deps) as JPEG/PNG/WebP, 96-320 px."""
    from conftest import encode, photo
    from PIL import Image

    out = []
    for i, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
        array = photo(name)
        for j, side in enumerate((96, 200, 320)):
            im = Image.fromarray(array)
            im.thumbnail((side, side))
            fmt = ("JPEG", "PNG", "WEBP")[(i + j) % 3]
            out.append(encode(np.asarray(im), fmt))
    return out


def bad_images(good: list[bytes], rng: random.Random) -> list[bytes]:
    """Inputs the server must refuse with INVALID_ARGUMENT: garbage, an empty image, a PNG
    signature with garbage after it, JPEG bytes cut to a header."""
    return [
        rng.randbytes(512),
        rng.randbytes(4096),
        b"",
        b"\x89PNG\r\n\x1a\n" + rng.randbytes(200),
        good[0][:64],
    ]


def make_request(case: Case, images: list[bytes]) -> pb.ExtractRequest:
    return pb.ExtractRequest(
        model=case.model,
        images=[pb.Image(encoded=b) for b in images],
        nodes=list(case.nodes),
        output=pb.OutputOptions(pool=POOLS[case.pool], normalize=case.normalize, dtype=case.dtype),
    )


def check_response(case: Case, n_images: int, response: pb.ExtractResponse) -> str | None:
    """None if the answer is what `case` promises, else what is wrong."""
    if len(response.results) != n_images:
        return f"{len(response.results)} results for {n_images} images"
    for result in response.results:
        keys = [o.key for o in result.outputs]
        if keys != list(case.nodes):
            return f"keys {keys} != {list(case.nodes)}"
        for out in result.outputs:
            t = out.tensor
            want = case.shapes[out.key]
            if tuple(t.shape) != want or t.dtype != case.dtype:
                return f"{out.key}: {t.dtype}{list(t.shape)} != {case.dtype}{list(want)}"
            if len(t.data) != math.prod(want) * ITEMSIZE[case.dtype]:
                return f"{out.key}: {len(t.data)} bytes for {list(want)}"
            if case.normalize and case.dtype == "float32":
                norm = float(np.linalg.norm(np.frombuffer(t.data, np.float32)))
                if not abs(norm - 1) < 1e-3:
                    return f"{out.key}: L2 norm {norm} after normalize"
    return None


# --- the load generator ----------------------------------------------------------------------
@dataclass
class Phase:
    """What one phase of load saw (requests attributed to the phase they started in)."""

    name: str
    seconds: float
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (good|bad, code)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    unexpected: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)  # sampled every 0.5 s
    images: int = 0
    # a request refused before any decoding (unknown node), sent every 50 ms: the server's
    # answer time for work it need not queue, next to the load
    probe: list[tuple[str, float]] = field(default_factory=list)  # (code, seconds)

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        ok = self.latency.get("OK", [])
        refused = self.latency.get("RESOURCE_EXHAUSTED", [])
        return {
            "phase": self.name,
            "seconds": round(self.seconds, 1),
            "requests": self.requests,
            "images_ok": self.images,
            "req_per_s": round(self.requests / self.seconds, 1),
            "statuses": {f"{k}:{c}": n for (k, c), n in sorted(self.counts.items())},
            "unexpected": len(self.unexpected),
            "ok_p50_ms": _ms(ok, 50),
            "ok_p99_ms": _ms(ok, 99),
            "ok_max_ms": _ms(ok, 100),
            "refused_p50_ms": _ms(refused, 50),
            "refused_p99_ms": _ms(refused, 99),
            "predecode_refusal_p50_ms": _ms([t for _, t in self.probe], 50),
            "predecode_refusal_p99_ms": _ms([t for _, t in self.probe], 99),
            "rss_first_mib": _mib(self.rss[0]) if self.rss else None,
            "rss_last_mib": _mib(self.rss[-1]) if self.rss else None,
            "rss_max_mib": _mib(max(self.rss)) if self.rss else None,
            "rss_median_mib": _mib(int(np.median(self.rss))) if self.rss else None,
        }


def _ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


async def drive(
    server: ServerProcess,
    cases: list[Case],
    phases: list[Phase],
    *,
    concurrency: int,
    bad_fraction: float,
    max_images: int = 4,
    seed: int = 0,
    channels: int = 4,
) -> None:
    """Closed-loop clients: `concurrency` tasks, each sending its next request as soon as the
    last one is answered, through the phases in order; returns when the last call is answered."""
    rng = random.Random(seed)
    good = good_images()
    bad = bad_images(good, rng)
    options = [("grpc.max_receive_message_length", 64 * 2**20)]
    chans = [grpc.aio.insecure_channel(server.target, options=options) for _ in range(channels)]
    stubs = [pb_grpc.FeatureServiceStub(c) for c in chans]
    started = time.monotonic()
    bounds, t = [], started
    for phase in phases:
        t += phase.seconds
        bounds.append(t)
    end = bounds[-1]

    def phase_at(now: float) -> Phase:
        return next((p for p, b in zip(phases, bounds, strict=True) if now < b), phases[-1])

    async def client(index: int) -> None:
        local = random.Random(seed * 1000 + index)
        stub = stubs[index % len(stubs)]
        while (now := time.monotonic()) < end:
            phase = phase_at(now)
            case = local.choice(cases)
            images = [local.choice(good) for _ in range(local.randint(1, max_images))]
            kind = "good"
            if local.random() < bad_fraction:
                kind = "bad"
                images[local.randrange(len(images))] = local.choice(bad)
            sent = time.monotonic()
            code, problem = OK, None
            try:
                response = await stub.Extract(make_request(case, images), timeout=CALL_TIMEOUT_S)
                problem = check_response(case, len(images), response)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                problem = f"{exc.details()}"[:200]
            took = time.monotonic() - sent
            phase.counts[(kind, code.name)] += 1
            phase.latency[code.name].append(took)
            expected = (OK,) if kind == "good" else (INVALID,)
            if phase.name.startswith("overload"):
                expected = (*expected, EXHAUSTED)
            if code not in expected or (code == OK and problem):
                phase.unexpected.append(f"{kind} {case.model}{case.nodes} {code.name}: {problem}")
            elif code == OK:
                phase.images += len(images)

    async def probe() -> None:
        bad_node = pb.ExtractRequest(
            model=cases[0].model, images=[pb.Image(encoded=good[0])], nodes=["no_such_node"]
        )
        while (now := time.monotonic()) < end:
            phase = phase_at(now)
            code = OK
            try:
                await stubs[0].Extract(bad_node, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            phase.probe.append((code.name, time.monotonic() - now))
            if code != INVALID:
                phase.unexpected.append(f"unknown-node probe: {code.name}")
            await asyncio.sleep(0.05)

    async def sample_rss() -> None:
        while (now := time.monotonic()) < end:
            phase_at(now).rss.append(server.rss_bytes())
            await asyncio.sleep(0.5)

    try:
        await asyncio.gather(sample_rss(), probe(), *(client(i) for i in range(concurrency)))
    finally:
        for channel in chans:
            await channel.close()


def run_soak(
    folder: Path, warmup_s: float = 10, duration_s: float = 60, concurrency: int = 64
) -> dict[str, Any]:
    """The soak scenario; returns its figures (the warm-up and the measured phase)."""
    config = write_config(folder, max_queue_images=512, max_batch_size=8, max_wait_ms=2)
    server = ServerProcess(config, folder / "soak-server.log")
    try:
        server.wait_serving()
        cases = build_cases(server.target)
        phases = [Phase("warmup", warmup_s), Phase("soak", duration_s)]
        asyncio.run(drive(server, cases, phases, concurrency=concurrency, bad_fraction=0.05))
        server_counts = server.metrics()
        forwards, shared = server.forwards()
    finally:
        exit_code = server.stop()
    warm, soak = phases
    # Growth is the median of the soak's last third against the median of its first third:
    # single samples swing with the batch in flight and the allocator (one run's first sample
    # was a 55 MiB dip, so first -> last read +5.9 % with both medians at ~957 MiB).
    third = max(1, len(soak.rss) // 3)
    rss_before = int(np.median(soak.rss[:third]))
    rss_after = int(np.median(soak.rss[-third:]))
    return {
        "scenario": "soak",
        "concurrency": concurrency,
        "warmup": warm.summary(),
        "soak": soak.summary(),
        "rss_before_mib": _mib(rss_before),  # median of the soak's first third
        "rss_after_mib": _mib(rss_after),  # median of its last third
        "rss_growth_pct": round(100 * (rss_after - rss_before) / rss_before, 2),
        "unexpected_examples": (warm.unexpected + soak.unexpected)[:10],
        "client_counts": _by_code(warm, soak),
        "server_counts": _sum_models(server_counts),
        "forwards": forwards,  # over warm-up and soak
        "forwards_of_several_images": shared,
        "exit_code": exit_code,
        "log_tail": server.log_tail(1500) if exit_code else "",
    }


def run_overload(
    folder: Path,
    windows: int = 2,
    window_s: float = 5,
    ramp_s: float = 4,
    concurrency: int = 128,
    recovery_s: float = 4,
    max_queue_images: int = 16,
) -> dict[str, Any]:
    """A small queue, `concurrency` closed-loop clients on resnet18 (1-2 images each): a
    `ramp_s` ramp, then `windows` windows of `window_s`; then concurrency 2 for `recovery_s`."""
    config = write_config(
        folder, max_queue_images=max_queue_images, max_batch_size=8, max_wait_ms=2
    )
    server = ServerProcess(config, folder / "overload-server.log")
    try:
        server.wait_serving()
        cases = [c for c in build_cases(server.target) if c.model == "r18"]
        overload = [Phase("overload-ramp", ramp_s)]
        overload += [Phase(f"overload-{i + 1}", window_s) for i in range(windows)]
        load = drive(
            server, cases, overload, concurrency=concurrency, bad_fraction=0.0, max_images=2
        )
        asyncio.run(load)
        recovery = [Phase("recovery", recovery_s)]
        asyncio.run(drive(server, cases, recovery, concurrency=2, bad_fraction=0.0, seed=1))
    finally:
        exit_code = server.stop()
    return {
        "scenario": "overload",
        "concurrency": concurrency,
        "max_queue_images": max_queue_images,
        "phases": [p.summary() for p in (*overload, *recovery)],
        "unexpected_examples": [u for p in (*overload, *recovery) for u in p.unexpected][:10],
        "exit_code": exit_code,
        "log_tail": server.log_tail(1500) if exit_code else "",
    }


def _by_code(*phases: Phase) -> dict[str, int]:
    out: Counter[str] = Counter()
    for phase in phases:
        for (_, code), n in phase.counts.items():
            out[code] += n
        for code, _ in phase.probe:
            out[code] += 1
    return dict(out)


def _sum_models(counts: dict[tuple[str, str], float]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for (_, code), n in counts.items():
        out[code] += int(n)
    return dict(out)


# --- the tests -------------------------------------------------------------------------------
def test_soak_mixed_load(tmp_path: Path, record_property: Any) -> None:
    figures = run_soak(tmp_path)
    print("SOAK_RESULT " + json.dumps(figures))
    record_property("figures", json.dumps(figures))
    soak = figures["soak"]
    assert figures["unexpected_examples"] == [], figures["unexpected_examples"]
    # It really was under load, by counts rather than speed (a loaded runner is slower, not
    # different): every client went round many times and requests shared forwards.
    assert soak["requests"] > 4 * figures["concurrency"], soak
    assert figures["forwards_of_several_images"] > 0, figures
    assert soak["statuses"].get("bad:INVALID_ARGUMENT", 0) > 0, soak
    assert set(soak["statuses"]) <= {"good:OK", "bad:INVALID_ARGUMENT"}, soak
    # nothing lost: the server counted exactly what the clients saw
    assert figures["server_counts"] == figures["client_counts"], figures
    assert figures["rss_growth_pct"] < 5, figures
    assert figures["exit_code"] == 0, figures["log_tail"]


@pytest.fixture(scope="module")
def overload_figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    figures = run_overload(tmp_path_factory.mktemp("overload"))
    print("OVERLOAD_RESULT " + json.dumps(figures))
    return figures


def test_overload_refuses_and_recovers(
    overload_figures: dict[str, Any], record_property: Any
) -> None:
    figures = overload_figures
    record_property("figures", json.dumps(figures))
    ramp, *windows, recovery = figures["phases"]
    first, last = windows[0], windows[-1]
    assert figures["unexpected_examples"] == [], figures["unexpected_examples"]
    # Latencies (accepted p99, refusal p50/p99 against a validation refusal, their trend from
    # window to window) are figures, not assertions: they depend on the runner's load, and
    # bench/reliability_figures.py records them in docs/RELIABILITY.md. What does not depend
    # on speed is asserted: some are refused, work still gets done, memory stays bounded, and
    # (tests/reliability/test_queue_full.py) a refusal is decided before any decoding.
    for phase in windows:
        refused = phase["statuses"].get("good:RESOURCE_EXHAUSTED", 0)
        # above capacity: requests are refused. Not "most" any more, and no share is asserted:
        # the 128 callers share one connection, so one client, and a caller past what its
        # client may hold waits client_wait_ms (1 s) for room before its refusal, so how many
        # are refused depends on how fast the runner serves the rest (RELIABILITY.md: 18 to
        # 49 % refused in the runs recorded, against 96-98 % before)
        assert refused > 0, phase
        assert phase["statuses"].get("good:OK", 0) > 0, phase  # ...while work still gets done
        # memory is bounded: it swings by up to ~15 % from window to window (allocator, in-flight
        # buffers), with no trend over 40 s (bench/reliability_figures.py --overload-windows 8)
        assert phase["rss_max_mib"] < 1.35 * ramp["rss_last_mib"], (ramp, phase)
    assert last["rss_median_mib"] < 1.20 * first["rss_median_mib"], (first, last)
    # when the load drops, everything is served again, at once
    assert recovery["statuses"] == {"good:OK": recovery["requests"]}, recovery
    # at least one round of both clients: how many more fit in 4 s is the runner's speed (a
    # fresh-clone run beside other work managed 5, an idle one ~40)
    assert recovery["requests"] >= 2, recovery
    assert figures["exit_code"] == 0, figures["log_tail"]
