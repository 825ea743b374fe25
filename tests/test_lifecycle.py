"""Server lifecycle: health through loading and warm-up, graceful drain on SIGTERM of a real
`layertap serve` process, and its JSON log lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import torchvision
from conftest import RunningServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from layertap.server.app import create_server
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LOAD_DELAY_S = 1.5

# Real (non-traced) forwards of the counting model, counted by a hook on its first conv.
FORWARDS = {"count": 0}


def counting_resnet18() -> nn.Module:
    """Factory (used as "test_lifecycle:counting_resnet18"): slow to load, counts forwards.

    The hook is on a leaf module, so it fires in eager forwards and in traced extractors, but not
    while torch.fx traces (the tracer does not call leaf modules).
    """
    time.sleep(LOAD_DELAY_S)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)

    def count(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor) and type(output) is torch.Tensor:
            FORWARDS["count"] += 1

    model.conv1.register_forward_hook(count)
    return model


def _boot_without_waiting(settings: Settings) -> RunningServer:
    """Like conftest.start_server, but returns as soon as the port serves (models still loading)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="lifecycle-server", daemon=True)
    thread.start()

    async def boot() -> tuple[Any, int]:
        server, port = await create_server(settings)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(boot(), loop).result(60)
    return RunningServer(server, port, loop, thread)


def _check(stub: health_pb2_grpc.HealthStub, service: str, timeout: float = 5) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


@pytest.mark.parametrize("warmup", [True, False])
def test_health_not_serving_until_loaded_and_warmed_up(warmup: bool) -> None:
    name = "slow"
    services = ("", "layertap.v1.FeatureService", f"layertap.model.{name}")
    settings = Settings(
        port=0,
        metrics=False,
        warmup=warmup,
        models=(
            ModelConfig(
                name=name,
                factory="test_lifecycle:counting_resnet18",
                weights="none",
                allow_random=True,
            ),
        ),
    )
    forwards_before = FORWARDS["count"]
    running = _boot_without_waiting(settings)
    try:
        with grpc.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # The factory sleeps LOAD_DELAY_S: everything is NOT_SERVING while it loads.
            for service in services:
                assert _check(health, service) == NOT_SERVING, service

            with pytest.raises(grpc.RpcError) as info:
                _check(health, "layertap.model.nope")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            seen: dict[str, list[int]] = {s: [] for s in services}
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                for service in services:
                    seen[service].append(_check(health, service))
                if all(v[-1] == SERVING for v in seen.values()):
                    break
                time.sleep(0.05)
            forwards_at_serving = FORWARDS["count"] - forwards_before
            for service, statuses in seen.items():
                assert statuses[-1] == SERVING, f"{service!r} never SERVING: {statuses[-5:]}"
                # once SERVING it stays SERVING
                first = statuses.index(SERVING)
                assert set(statuses[first:]) == {SERVING}, (service, statuses)
                assert set(statuses[:first]) <= {NOT_SERVING}, (service, statuses)

            if warmup:
                assert forwards_at_serving >= 1, "SERVING before any warm-up forward ran"
            else:
                assert forwards_at_serving == 0, "warmup = false still ran a forward"

            # When health says SERVING, the model really serves.
            models = pb_grpc.FeatureServiceStub(channel).ListModels(
                pb.ListModelsRequest(), timeout=30
            )
            assert [(m.name, m.ready) for m in models.models] == [(name, True)]
            with pytest.raises(grpc.RpcError) as info:
                _check(health, "layertap.model.nope")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        running.stop()


# --- graceful drain of a real process --------------------------------------------------------
GRACE_S = 20
N_CALLS = 12
IMAGES_PER_CALL = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_log(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture()
def served_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path, int]]:
    """A `layertap serve` process: (process, gRPC target, its stderr file, metrics port)."""
    config = tmp_path / "layertap.toml"
    config.write_text(
        '[server]\nlog_level = "INFO"\n\n'
        '[[models]]\nname = "r18"\narch = "resnet18"\nweights = "none"\nallow_random = true\n'
    )
    port, metrics_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERTAP_")}
    env["LAYERTAP_HTTP_PORT"] = "0"  # never a fixed port in tests
    env["LAYERTAP_LOG_FORMAT"] = "json"
    stderr_path = tmp_path / "server.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "layertap.client.cli",
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-host",
                "127.0.0.1",
                "--metrics-port",
                str(metrics_port),
                "--shutdown-grace-s",
                str(GRACE_S),
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    try:
        yield proc, f"127.0.0.1:{port}", stderr_path, metrics_port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _wait_serving(proc: subprocess.Popen[bytes], target: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"server exited early: {log.read_text()[-3000:]}"
            try:
                if _check(health, "", timeout=2) == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail(f"server never SERVING: {log.read_text()[-3000:]}")


def _extracts_arrived(metrics_port: int) -> float:
    """Extract calls the server has taken in (being served, or finished OK), by its own count
    on its /metrics page."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("method", "").endswith("Extract")
        and (
            sample.name == "layertap_requests_in_flight"
            or (sample.name == "layertap_requests_total" and sample.labels.get("code") == "OK")
        )
    )


def test_sigterm_drains_in_flight_requests_then_exits_zero(
    served_process: tuple[subprocess.Popen[bytes], str, Path, int], jpegs: dict[str, bytes]
) -> None:
    proc, target, log, metrics_port = served_process
    _wait_serving(proc, target, log)
    photos = list(jpegs.values())

    channel = grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    )
    stub = pb_grpc.FeatureServiceStub(channel)

    # One failing request with our id, to find its log line later.
    with pytest.raises(grpc.RpcError) as info:
        stub.Extract(
            pb.ExtractRequest(
                model="r18", images=[pb.Image(encoded=photos[0])], nodes=["no_such_node"]
            ),
            metadata=(("x-request-id", "drain-test-bad-node"),),
            timeout=30,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def request(i: int) -> pb.ExtractRequest:
        images = [pb.Image(encoded=photos[(i + k) % len(photos)]) for k in range(IMAGES_PER_CALL)]
        return pb.ExtractRequest(
            model="r18",
            images=images,
            nodes=["layer3", "layer4"],
            output=pb.OutputOptions(pool=pb.POOLING_AVG),
        )

    futures: list[Future[pb.ExtractResponse]] = [
        stub.Extract.future(request(i), timeout=GRACE_S + 30) for i in range(N_CALLS)
    ]
    # Signal once the server itself counts every call in flight (not after a guessed delay):
    # the worker is busy with the first ones and the rest are queued behind them.
    arrived = time.monotonic() + 60
    while _extracts_arrived(metrics_port) < N_CALLS:
        assert time.monotonic() < arrived, "the calls never all reached the server"
        assert not all(f.done() for f in futures), "every call finished before SIGTERM"
        time.sleep(0.01)
    running_at_signal = sum(not f.done() for f in futures)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert running_at_signal > 0, "every call finished before SIGTERM: nothing to drain"

    # Health flips to NOT_SERVING first, while the server still serves (shutdown_delay_s), then
    # the port closes (UNAVAILABLE). A probe that races the listener's shutdown may come back
    # CANCELLED (grpc core); poll past it.
    statuses: list[str] = []
    with grpc.insecure_channel(target) as probe_channel:
        health = health_pb2_grpc.HealthStub(probe_channel)
        while time.monotonic() - signalled < GRACE_S and proc.poll() is None:
            try:
                statuses.append(
                    health_pb2.HealthCheckResponse.ServingStatus.Name(_check(health, "", timeout=1))
                )
            except grpc.RpcError as exc:
                statuses.append(exc.code().name)
            if statuses[-1] == "UNAVAILABLE":
                break
            time.sleep(0.02)
    assert "NOT_SERVING" in statuses, statuses
    assert statuses[-1] in ("NOT_SERVING", "UNAVAILABLE"), statuses
    first_down = next(i for i, s in enumerate(statuses) if s != "SERVING")
    assert "SERVING" not in statuses[first_down:], statuses

    # A new call after the signal is refused.
    with grpc.insecure_channel(target) as late_channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.FeatureServiceStub(late_channel).Extract(request(0), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value

    # Every call started before the signal completes, with real results.
    with ThreadPoolExecutor(1) as pool:
        results = list(pool.map(lambda f: f.result(GRACE_S + 30), futures))
    for response in results:
        assert len(response.results) == IMAGES_PER_CALL
        for result in response.results:
            assert [o.key for o in result.outputs] == ["layer3", "layer4"]
            assert list(result.outputs[1].tensor.shape) == [512]
    channel.close()

    code = proc.wait(GRACE_S + 10)
    took = time.monotonic() - signalled
    assert code == 0, f"exit code {code}: {log.read_text()[-3000:]}"
    assert took < GRACE_S + 5, f"exit took {took:.1f}s"

    # The JSON log: one object per line with the documented keys.
    lines = _read_log(log)
    assert len(lines) >= 3, lines
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"stderr line is not JSON: {line!r}")
        assert isinstance(record, dict), line
        assert {"ts", "level", "logger", "msg"} <= set(record), record
        records.append(record)
    bad = [r for r in records if r.get("request_id") == "drain-test-bad-node"]
    assert len(bad) == 1, f"no log line for the failed request: {records}"
    assert bad[0]["level"] == "WARNING"
    assert "Extract" in str(bad[0].get("method"))
    assert bad[0].get("model") == "r18"
    assert "INVALID_ARGUMENT" in str(bad[0].get("code")), bad[0]
    assert float(bad[0]["duration_ms"]) >= 0
