"""Several devices: one worker, model copy and batcher each, behind a Dispatcher that sends each
request to the least-loaded device. On CPU, `devices = ["cpu", "cpu"]` runs two workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import factories
import numpy as np
import pytest
import torch
from conftest import start_server

from layertap.server.batcher import Batcher
from layertap.server.dispatch import Dispatcher
from layertap.server.settings import ModelConfig, Settings, load_settings
from layertap.v1 import layertap_pb2 as pb

SIZE = 32


class Recorder:
    def __init__(self, name: str, delay: float) -> None:
        self.name, self.delay = name, delay
        self.seen: list[Any] = []

    async def __call__(self, key: Hashable, payloads: list[Any]) -> Sequence[Any]:
        self.seen.extend(payloads)
        await asyncio.sleep(self.delay)
        return [(self.name, p) for p in payloads]


async def test_dispatcher_sends_each_request_to_the_least_loaded_batcher() -> None:
    slow, fast = Recorder("a", 0.05), Recorder("b", 0.05)
    a, b = Batcher(slow, name="a"), Batcher(fast, name="b")
    d = Dispatcher([a, b])
    first = d.submit_many("k", [1, 2, 3])  # a: 3 owed
    second = d.submit_many("k", [4])  # b is emptier
    third = d.submit_many("k", [5])  # b: 1, a: 3
    with d.reserve(2):  # b: 2 owed now, a: 3 -> b again; the submit follows the reservation
        assert b.load == 4 and a.load == 3
        fourth = d.submit_many("k", [6, 7], reserved=True)
    fifth = d.submit_many("k", [8])  # a: 3, b: 4
    results = await asyncio.gather(*first, *second, *third, *fourth, *fifth)
    served = {p: info.device for (_, p), info in results}
    assert served == {1: "a", 2: "a", 3: "a", 4: "b", 5: "b", 6: "b", 7: "b", 8: "a"}
    assert d.batches_run == a.batches_run + b.batches_run
    await d.close()
    assert d.queued == 0


def test_devices_setting_reads_a_list_or_commas() -> None:
    assert load_settings(["--devices", "cpu, cpu"], env={}).devices == ("cpu", "cpu")
    assert load_settings([], env={"LAYERTAP_DEVICES": "cuda:0,cuda:1"}).devices == (
        "cuda:0",
        "cuda:1",
    )
    assert load_settings([], env={}).devices == ()


def _until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def _request(x: np.ndarray) -> pb.ExtractRequest:
    tensor = pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes())
    return pb.ExtractRequest(model="two", images=[pb.Image(tensor=tensor)], nodes=["mean"])


def test_two_cpu_workers_share_the_load_and_agree() -> None:
    settings = Settings(
        port=0,
        metrics=False,
        devices=("cpu", "cpu"),
        models=(
            ModelConfig(
                name="two",
                factory="factories:probe_net",
                kwargs={"tag": "two"},
                weights="none",
                allow_random=True,
                input_size=(SIZE, SIZE),
                leaf_modules=("factories:Probe",),
            ),
        ),
    )
    running = start_server(settings)
    hold = factories.hold_probe("two")  # type: ignore[attr-defined]
    try:
        runtimes = running.server.runtimes
        assert len(runtimes) == 2 and runtimes[0] is not runtimes[1]
        assert runtimes[0].worker_thread_ident != runtimes[1].worker_thread_ident
        first, second = (r.model("two").weights.module for r in runtimes)
        assert first is not second  # each worker owns its own copy
        images = [_image(5.0 + i, seed=i) for i in range(4)]
        stub = running.stub()
        futures = [stub.Extract.future(_request(images[0]), timeout=30)]
        _until(lambda: 5.0 in _seen(), what="the first forward to start")
        futures.append(stub.Extract.future(_request(images[1]), timeout=30))
        # the second runs beside the first (the first is held in its forward)
        _until(lambda: 6.0 in _seen(), what="the second forward to start")
        assert not futures[0].done()
        futures += [stub.Extract.future(_request(x), timeout=30) for x in images[2:]]
        _until(lambda: running.server.batcher.queued == 2, what="the other two to queue")
        hold.set()
        responses = [f.result(30) for f in futures]
    finally:
        hold.set()
        running.stop()
    devices = [r.metadata.device for r in responses]
    assert devices[:2] == ["cpu/0", "cpu/1"], devices  # the second went to the idle worker
    assert set(devices[2:]) == {"cpu/0", "cpu/1"}, devices  # one each: equal loads
    reference = factories.probe_net("reference")
    for response, x in zip(responses, images, strict=True):
        got = np.frombuffer(response.results[0].outputs[0].tensor.data, np.float32)
        with torch.inference_mode():
            want = reference(torch.from_numpy(x)).numpy()[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _image(value: float, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).uniform(-1, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    x.flat[0] = value
    return x


def _seen() -> list[float]:
    return [m for e in factories.probe_log("two") for m in e["max"]]  # type: ignore[attr-defined]
