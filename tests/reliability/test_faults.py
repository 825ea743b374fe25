"""Faults, injected into a real server on 127.0.0.1:0: a client cancelling mid-batch, deadlines
shorter than the queue wait, corrupt or missing weights, an exception inside a forward, and a
(simulated) CUDA out-of-memory.

The models are `factories.probe_net`: a leaf `Probe` module sees every real input batch, records
it (`factories.probe_log`), and can be slow, fail or run "out of memory" on demand, so each test
knows exactly what the worker computed. SIGTERM under load is `tests/test_lifecycle.py::
test_sigterm_drains_in_flight_requests_then_exits_zero` (a real `layertap serve` process).

Every wait here is bounded (`_until`); each test takes about a second. A test that needs the
worker busy holds the probe's forward (`factories.hold_probe`) until it has set up what it
tests, instead of racing a fixed forward time: a loaded runner changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import factories
import grpc
import numpy as np
import pytest
import torch
from conftest import RunningServer, probe_config, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

SIZE = 32  # every probe model's input size
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# weights files the load-error models point at (missing.pth is never written)
BAD_WEIGHTS = ("corrupt.pth", "truncated.pth", "missing.pth", "corrupt.safetensors")


def _probe_model(name: str, **kwargs: Any) -> ModelConfig:
    return probe_config(name, SIZE, kwargs)


def _write_bad_weights(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    paths = {name: folder / name for name in BAD_WEIGHTS}
    paths["corrupt.pth"].write_bytes(rng.bytes(4096))
    paths["corrupt.safetensors"].write_bytes(rng.bytes(4096))
    good = folder / "good.pth"
    torch.save(factories.tiny_net(4).state_dict(), good)
    paths["truncated.pth"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return paths  # missing.pth is never written


@pytest.fixture(scope="module")
def faults_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    weights = _write_bad_weights(tmp_path_factory.mktemp("bad-weights"))
    bad_models = tuple(
        ModelConfig(
            name=f"bad-{name.replace('.', '-')}",
            factory="factories:tiny_net",
            kwargs={"width": 4},
            weights=str(path),
            input_size=(SIZE, SIZE),
        )
        for name, path in weights.items()
    )
    settings = Settings(
        port=0,
        max_batch_size=8,
        max_wait_ms=50,
        models=(
            _probe_model("slow"),  # "slow" while a test holds it (_blocker)
            _probe_model("faulty", fail_above=100.0),
            _probe_model("oomy", oom_above=2, oom_value_above=1000.0),
            *bad_models,
            ModelConfig(
                name="tiny",
                factory="factories:tiny_net",
                kwargs={"width": 4},
                weights="none",
                allow_random=True,
                input_size=(SIZE, SIZE),
            ),
        ),
    )
    running = start_server(settings)
    running.bad_weights = weights  # type: ignore[attr-defined]
    yield running
    running.stop()


# --- helpers -----------------------------------------------------------------------------
REFERENCE = factories.probe_net("reference")  # the same seeded weights as every probe model


def _image(value: float, seed: int = 0) -> np.ndarray:
    """A float32 [1, 3, SIZE, SIZE] input whose maximum is exactly `value` (a marker the probe
    log shows), the rest small noise."""
    x = np.random.default_rng(seed).uniform(-1, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    x.flat[0] = value
    return x


def _request(model: str, *images: np.ndarray, node: str = "mean") -> pb.ExtractRequest:
    return pb.ExtractRequest(
        model=model,
        images=[
            pb.Image(tensor=pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes()))
            for x in images
        ],
        nodes=[node],
    )


def _expected(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return REFERENCE(torch.from_numpy(x)).numpy()[0]


def _check_values(response: pb.ExtractResponse, *images: np.ndarray) -> None:
    assert len(response.results) == len(images)
    for result, x in zip(response.results, images, strict=True):
        (out,) = result.outputs
        assert out.key == "mean" and list(out.tensor.shape) == [4]
        got = np.frombuffer(out.tensor.data, np.float32)
        np.testing.assert_allclose(got, _expected(x), rtol=1e-5, atol=1e-5)


def _until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.005)


def _seen(tag: str) -> list[float]:
    """Every per-image maximum the probe of `tag` computed so far."""
    return [m for event in factories.probe_log(tag) for m in event["max"]]  # type: ignore[attr-defined]


def _sample(server: RunningServer, name: str, **labels: str) -> float:
    assert server.server.metrics is not None
    return server.server.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.contextmanager
def _held(model: str) -> Iterator[threading.Event]:
    """From here on, `model`'s forwards wait until the yielded event is set (at the latest
    on leaving the block, whatever happened)."""
    hold = factories.hold_probe(model)  # type: ignore[attr-defined]
    try:
        yield hold
    finally:
        hold.set()


@contextlib.contextmanager
def _blocker(stub: Any, model: str, marker: float) -> Iterator[tuple[Any, threading.Event]]:
    """A request whose forward keeps the worker busy until the test sets the yielded event;
    entered once that forward has started."""
    with _held(model) as hold:
        future = stub.Extract.future(_request(model, _image(marker)), timeout=60)
        _until(lambda: marker in _seen(model), what=f"{model} blocker to start")
        yield future, hold


# --- cancellation ------------------------------------------------------------------------
def test_cancel_while_batch_computes_leaves_the_rest_of_the_batch_intact(
    faults_server: RunningServer, record_property: Callable[[str, object], None]
) -> None:
    stub = faults_server.stub()
    images = [_image(20.0 + i, seed=i) for i in range(4)]
    with _blocker(stub, "slow", 11.0) as (blocker, hold), _held("slow") as batch_hold:
        futures = [stub.Extract.future(_request("slow", x), timeout=30) for x in images]
        _until(lambda: faults_server.server.batcher.queued == 4, what="4 queued requests")
        # the blocker ends; the four run as one batch; cancel one while that forward runs
        hold.set()
        _until(lambda: 23.0 in _seen("slow"), what="the batch of 4 to start")
        batch = factories.probe_log("slow")[-1]
        assert batch["batch"] == 4 and sorted(batch["max"]) == [20.0, 21.0, 22.0, 23.0], batch  # type: ignore[type-var]
        futures[1].cancel()
        batch_hold.set()

    blocker.result(30)
    for i in (0, 2, 3):
        response = futures[i].result(30)
        _check_values(response, images[i])
        assert response.metadata.batch_size == 4
    assert futures[1].cancelled()
    with pytest.raises(grpc.FutureCancelledError):
        futures[1].result(1)
    # the server noted the cancellation and serves on
    _until(
        lambda: (
            _sample(
                faults_server,
                "layertap_requests_total",
                method="Extract",
                model="slow",
                code="CANCELLED",
            )
            >= 1
        ),
        what="the CANCELLED count",
    )
    after = _image(30.0, seed=9)
    _check_values(stub.Extract(_request("slow", after), timeout=30), after)
    record_property(
        "outcome",
        "cancel during compute: 3 others OK with exact values (batch of 4); "
        "cancelled call CANCELLED; next request OK",
    )


def test_cancel_while_queued_drops_the_item_before_compute(
    faults_server: RunningServer, record_property: Callable[[str, object], None]
) -> None:
    stub = faults_server.stub()
    images = [_image(40.0 + i, seed=10 + i) for i in range(4)]
    batcher = faults_server.server.batcher
    with _blocker(stub, "slow", 12.0) as (blocker, _):
        futures = [stub.Extract.future(_request("slow", x), timeout=30) for x in images]
        _until(lambda: batcher.queued == 4, what="4 queued requests")
        cancelled = batcher.dropped.get("cancelled", 0)
        futures[2].cancel()
        # the cancel reaches the server while the item is still queued: a drop
        _until(lambda: batcher.dropped.get("cancelled", 0) == cancelled + 1, what="the drop")
        assert not blocker.done()
    blocker.result(30)
    for i in (0, 1, 3):
        response = futures[i].result(30)
        _check_values(response, images[i])
        assert response.metadata.batch_size == 3
    assert 42.0 not in _seen("slow"), "a cancelled request was computed"
    batch = next(e for e in factories.probe_log("slow") if 40.0 in e["max"])  # type: ignore[operator]
    assert batch["batch"] == 3, batch
    record_property(
        "outcome",
        "cancel while queued: item dropped before compute (batch of 3 ran); "
        "others OK with exact values",
    )


# --- deadlines ---------------------------------------------------------------------------
def test_deadline_shorter_than_queue_wait_is_deadline_exceeded_without_compute(
    faults_server: RunningServer, record_property: Callable[[str, object], None]
) -> None:
    stub = faults_server.stub()
    images_before = _sample(faults_server, "layertap_images_total", model="slow")
    marker = 77.0
    with _blocker(stub, "slow", 13.0) as (blocker, _):
        sent = time.monotonic()
        future = stub.Extract.future(_request("slow", _image(marker)), timeout=1.0)
        queued = False
        while not future.done() and time.monotonic() - sent < 30:
            queued = queued or faults_server.server.batcher.queued >= 1
            time.sleep(0.002)
        with pytest.raises(grpc.RpcError) as info:
            future.result(5)
        took = time.monotonic() - sent
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
        assert queued, "the request never reached the batch queue"
        # answered at its deadline, not after the compute ahead of it: the worker is still held
        assert not blocker.done()
    _check_values(blocker.result(30), _image(13.0))
    after = _image(14.0, seed=3)
    _check_values(stub.Extract(_request("slow", after), timeout=30), after)

    assert marker not in _seen("slow"), "an expired request was computed"
    # only the blocker and the follow-up were extracted
    assert _sample(faults_server, "layertap_images_total", model="slow") == images_before + 2
    record_property(
        "outcome",
        f"DEADLINE_EXCEEDED after {took * 1000:.0f} ms (deadline 1000 ms, worker held busy "
        "until after it); never computed; images_total +2 (blocker, follow-up)",
    )


# --- weights that cannot load ------------------------------------------------------------
@pytest.mark.parametrize(
    "weights",
    [
        "corrupt.pth",
        "truncated.pth",
        "missing.pth",
        "corrupt.safetensors",
    ],
)
def test_bad_weights_file_makes_that_model_not_serving_with_a_reason(
    faults_server: RunningServer, weights: str, record_property: Callable[[str, object], None]
) -> None:
    name = f"bad-{weights.replace('.', '-')}"
    path: Path = faults_server.bad_weights[weights]  # type: ignore[attr-defined]
    with faults_server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def check(service: str) -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            return int(health.Check(request, timeout=10).status)

        assert check(f"layertap.model.{name}") == NOT_SERVING
        assert check("") == SERVING and check("layertap.model.tiny") == SERVING
        stub = faults_server.stub()
        info = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        assert not info[name].ready and info["tiny"].ready
        reason = info[name].status_message
        record_property("outcome", f"NOT_SERVING; ListModels status_message: {reason[:160]!r}")
        with pytest.raises(grpc.RpcError) as err:
            stub.Extract(_request(name, _image(1.0)), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed to load" in str(err.value.details())
        ok = stub.Extract(_request("tiny", _image(1.0), node="head"), timeout=10)
        assert list(ok.results[0].outputs[0].tensor.shape) == [4]
    # the reason names the file and what is wrong with it
    assert path.name in reason, reason
    expected = "does not exist" if weights == "missing.pth" else "cannot load"
    assert expected in reason, reason


# --- an exception inside a forward ------------------------------------------------------
def test_exception_in_forward_fails_only_that_batch_and_the_worker_survives(
    faults_server: RunningServer,
    caplog: pytest.LogCaptureFixture,
    record_property: Callable[[str, object], None],
) -> None:
    stub = faults_server.stub()
    worker = faults_server.server.runtime.worker_thread_ident
    internal_before = _sample(
        faults_server, "layertap_requests_total", method="Extract", model="faulty", code="INTERNAL"
    )
    caplog.set_level(logging.ERROR, logger="layertap")
    # one poisoned image (max 500 > fail_above) and two good ones queue up into one batch
    batch = [_image(60.0, seed=1), _image(500.0, seed=2), _image(61.0, seed=3)]
    with _blocker(stub, "faulty", 15.0) as (blocker, _):
        futures = [stub.Extract.future(_request("faulty", x), timeout=30) for x in batch]
        _until(lambda: faults_server.server.batcher.queued == 3, what="3 queued requests")
    _check_values(blocker.result(30), _image(15.0))
    codes, details = [], []
    for future in futures:
        with pytest.raises(grpc.RpcError) as info:
            future.result(30)
        codes.append(info.value.code())
        details.append(str(info.value.details()))
    assert codes == [grpc.StatusCode.INTERNAL] * 3, codes
    assert all("internal error in Extract" in d for d in details), details
    failed = next(e for e in factories.probe_log("faulty") if 500.0 in e["max"])  # type: ignore[operator]
    assert failed["batch"] == 3 and failed["outcome"] == "fault", failed

    # the worker thread is the same, alive, and the next batch succeeds
    assert faults_server.server.runtime.worker_thread_ident == worker
    alive = {t.ident: t for t in threading.enumerate()}
    assert worker in alive and alive[worker].is_alive()
    good = [_image(70.0, seed=4), _image(71.0, seed=5)]
    _check_values(stub.Extract(_request("faulty", *good), timeout=30), *good)
    assert (
        _sample(
            faults_server,
            "layertap_requests_total",
            method="Extract",
            model="faulty",
            code="INTERNAL",
        )
        == internal_before + 3
    )
    # the server log has the traceback with the real cause
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert any("injected fault" in str(r.exc_info[1]) for r in logged if r.exc_info), logged
    record_property(
        "outcome",
        f"3 requests of the batch INTERNAL ({details[0]!r}); traceback logged; "
        "worker thread alive; next batch OK",
    )


# --- out of memory -------------------------------------------------------------------------
def test_out_of_memory_splits_the_batch_and_lowers_the_model_batch_limit(
    faults_server: RunningServer, record_property: Callable[[str, object], None]
) -> None:
    stub = faults_server.stub()
    runtime = faults_server.server.runtime
    assert runtime.batch_cap("oomy") is None
    images = [_image(80.0 + i, seed=20 + i) for i in range(6)]
    start = len(factories.probe_log("oomy"))
    response = stub.Extract(_request("oomy", *images), timeout=30)
    _check_values(response, *images)
    events = factories.probe_log("oomy")[start:]
    assert events[0]["batch"] == 6 and events[0]["outcome"] == "oom", events
    computed = [m for e in events if e["outcome"] == "ok" for m in e["max"]]  # type: ignore[attr-defined]
    assert sorted(computed) == [80.0 + i for i in range(6)], events  # each image exactly once
    cap = runtime.batch_cap("oomy")
    assert cap is not None and 1 <= cap <= 2, cap

    # later batches respect the lowered limit: no more out-of-memory
    start = len(factories.probe_log("oomy"))
    again = [_image(90.0 + i, seed=30 + i) for i in range(6)]
    response = stub.Extract(_request("oomy", *again), timeout=30)
    _check_values(response, *again)
    later = factories.probe_log("oomy")[start:]
    assert all(e["outcome"] == "ok" and e["batch"] <= cap for e in later), later  # type: ignore[operator]
    assert response.metadata.batch_size <= cap

    # a single image that cannot fit even alone: RESOURCE_EXHAUSTED naming the device
    with pytest.raises(grpc.RpcError) as info:
        stub.Extract(_request("oomy", _image(5000.0)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory on a single image" in str(info.value.details())
    record_property(
        "outcome",
        f"batch of 6 OOM → split {[e['batch'] for e in events]}, all 6 OK with exact "
        f"values; batch_cap → {cap}; next 6 images in batches of {[e['batch'] for e in later]}; "
        "single-image OOM → RESOURCE_EXHAUSTED",
    )
