"""Batching and thread settings as the server applies them, observed on a real server.

Per-model `preferred_batch_size` and `max_wait_ms` and the server's `preferred_batch_size` are
checked in the policies the server built and in behaviour: the worker is held busy by a probe
(factories.hold_probe) while requests queue behind it, and the server's own `max_wait_ms` is
10 minutes, so a batch only runs once its policy's target size is reached or its own wait is
zero; a setting that did not reach the batcher leaves the requests waiting (the test fails on
their 30 s timeout, not on any measured time). `low_priority_max_wait_ms` and
`companion_wait_ms` (given as command-line flags, on two CPU workers) are read back from every
device's batcher; `decode_threads` is the decode pool's size and `torch_threads` the worker
thread's torch thread count (unset: the usable cores split between the CPU workers).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import factories
import numpy as np
import pytest
import torch
from conftest import RunningServer, start_server

from layertap.server.batcher import Batcher
from layertap.server.batching import BatchPolicy
from layertap.server.devices import usable_cores
from layertap.server.dispatch import Dispatcher
from layertap.server.settings import ModelConfig, Settings, load_settings
from layertap.v1 import layertap_pb2 as pb

SIZE = 16
LONG_WAIT_MS = 600_000.0  # the server's max_wait_ms: nothing may depend on it running out
SERVER_PREFERRED = 3
DECODE_THREADS = 3
TORCH_THREADS = usable_cores() + 1  # never the default (the usable cores)


def _probe(name: str, **kwargs: object) -> ModelConfig:
    return ModelConfig(
        name=name,
        factory="factories:probe_net",
        kwargs={"tag": f"batching-{name}"},
        weights="none",
        allow_random=True,
        input_size=(SIZE, SIZE),
        leaf_modules=("factories:Probe",),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        metrics=False,
        max_batch_size=8,
        preferred_batch_size=SERVER_PREFERRED,
        max_wait_ms=LONG_WAIT_MS,
        companion_wait_ms=0,
        decode_threads=DECODE_THREADS,
        torch_threads=TORCH_THREADS,
        models=(
            _probe("blocker"),
            _probe("pair", preferred_batch_size=2),
            _probe("nowait", max_wait_ms=0),
            _probe("inherit"),
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def _request(model: str, value: float) -> pb.ExtractRequest:
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    x.flat[0] = value  # the probe records each image's maximum: which image ran when
    tensor = pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes())
    return pb.ExtractRequest(model=model, images=[pb.Image(tensor=tensor)], nodes=["mean"])


def _seen(model: str) -> list[float]:
    log = factories.probe_log(f"batching-{model}")  # type: ignore[attr-defined]
    return [m for e in log for m in e["max"]]


def _behind_busy_worker(server: RunningServer, model: str, count: int) -> list[int]:
    """`count` requests for `model` queued while the worker is held busy, then released:
    the batch size each was served in."""
    batcher = server.server.batcher
    stub = server.stub()
    value = 1000.0 + len(_seen("blocker"))  # unique per call
    hold = factories.hold_probe("batching-blocker")  # type: ignore[attr-defined]
    try:
        blocker = stub.Extract.future(_request("blocker", value), timeout=60)
        _until(lambda: value in _seen("blocker"), "the blocker to occupy the worker")
        futures = [stub.Extract.future(_request(model, i + 1.0), timeout=30) for i in range(count)]
        _until(lambda: batcher.queued == count, f"{count} queued {model} requests")
    finally:
        hold.set()
    blocker.result(60)
    return [f.result(30).metadata.batch_size for f in futures]


def _policy(server: RunningServer, model: str) -> BatchPolicy:
    batcher = server.server.batcher
    assert isinstance(batcher, Batcher) and batcher.policy is not None
    return batcher.policy((model, (3, SIZE, SIZE)))


def test_policies_take_model_overrides_else_the_server_values(server: RunningServer) -> None:
    wait = LONG_WAIT_MS / 1000
    assert _policy(server, "pair") == BatchPolicy(8, 2, wait)
    assert _policy(server, "nowait") == BatchPolicy(8, SERVER_PREFERRED, 0.0)
    assert _policy(server, "inherit") == BatchPolicy(8, SERVER_PREFERRED, wait)


def test_model_preferred_batch_size_ends_the_wait(server: RunningServer) -> None:
    # two queued: the model's preferred size; the server's (3) would keep them waiting
    assert _behind_busy_worker(server, "pair", 2) == [2, 2]


def test_server_preferred_batch_size_ends_the_wait(server: RunningServer) -> None:
    # three queued: the server's preferred size (the full batch, 8, would keep them waiting)
    assert _behind_busy_worker(server, "inherit", SERVER_PREFERRED) == [3, 3, 3]


def test_model_max_wait_ms_zero_runs_a_lone_queued_request(server: RunningServer) -> None:
    # one queued, nothing to wait for under the model's max_wait_ms = 0 (the server's: 10 min)
    assert _behind_busy_worker(server, "nowait", 1) == [1]


def test_decode_threads_is_the_decode_pool_size(server: RunningServer) -> None:
    pool = server.server.decode_pool
    assert pool._max_workers == DECODE_THREADS
    started = [threading.Event() for _ in range(DECODE_THREADS + 1)]
    release = threading.Event()

    def busy(i: int) -> None:
        started[i].set()
        release.wait(30)

    try:
        futures = [pool.submit(busy, i) for i in range(DECODE_THREADS + 1)]
        for event in started[:DECODE_THREADS]:  # as many at once as there are threads
            assert event.wait(30), "a decode thread did not start"
        # ThreadPoolExecutor starts its threads inside submit(): no more than decode_threads
        assert len(pool._threads) == DECODE_THREADS
        assert not started[DECODE_THREADS].is_set()
    finally:
        release.set()
    for future in futures:
        future.result(30)
    assert started[DECODE_THREADS].is_set()


def test_torch_threads_is_the_worker_threads_torch_thread_count(server: RunningServer) -> None:
    runtime = server.server.runtime
    threads = runtime._executor.submit(torch.get_num_threads).result(30)
    assert threads == TORCH_THREADS


def test_batcher_waits_come_from_the_flags_on_every_device(tmp_path: Path) -> None:
    config = tmp_path / "layertap.toml"
    config.write_text(
        '[[models]]\nname = "tiny"\nfactory = "factories:tiny_net"\nweights = "none"\n'
        "allow_random = true\ninput_size = [16, 16]\n"
    )
    flags = ["--config", str(config), "--port", "0", "--metrics", "off", "--warmup", "off"]
    flags += ["--devices", "cpu,cpu", "--low-priority-max-wait-ms", "250"]
    flags += ["--companion-wait-ms", "25"]
    running = start_server(load_settings(flags, env={}))
    try:
        dispatcher = running.server.batcher
        assert isinstance(dispatcher, Dispatcher) and len(dispatcher.batchers) == 2
        for batcher in dispatcher.batchers:
            assert batcher.low_priority_max_wait_s == pytest.approx(0.25)
            assert batcher.companion_wait_s == pytest.approx(0.025)
        # torch_threads unset (0): the usable cores split between the two CPU workers
        for runtime in running.server.runtimes:
            threads = runtime._executor.submit(torch.get_num_threads).result(30)
            assert threads == max(1, usable_cores() // 2)
    finally:
        running.stop()
