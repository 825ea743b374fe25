"""A full queue refuses before any decoding: queue room is reserved first, so a refusal costs
nothing proportional to the images sent. Event-driven (the probe model holds the worker busy;
the test waits on the batcher's own counts), so a loaded runner changes nothing.

The overload soak (tests/reliability/test_soak.py) used to show this by timing: refusals as fast
as a validation refusal. Here the order itself is pinned: an undecodable image in a request that
cannot fit is answered RESOURCE_EXHAUSTED, not INVALID_ARGUMENT; had it been decoded first, the
decoder's INVALID_ARGUMENT would have come back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import factories
import grpc
import numpy as np
import pytest
from conftest import encode, photo, start_server

from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

SIZE = 32
TAG = "queue-full"


def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def _tensor_request(value: float) -> pb.ExtractRequest:
    x = np.full((1, 3, SIZE, SIZE), value, dtype=np.float32)
    tensor = pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes())
    return pb.ExtractRequest(model=TAG, images=[pb.Image(tensor=tensor)], nodes=["mean"])


def _encoded_request(*images: bytes) -> pb.ExtractRequest:
    return pb.ExtractRequest(
        model=TAG, images=[pb.Image(encoded=b) for b in images], nodes=["mean"]
    )


def _probe_settings(**changes: object) -> Settings:
    return Settings(
        port=0,
        max_batch_size=1,
        warmup=False,
        models=(
            ModelConfig(
                name=TAG,
                factory="factories:probe_net",
                kwargs={"tag": TAG},
                weights="none",
                allow_random=True,
                input_size=(SIZE, SIZE),
                leaf_modules=("factories:Probe",),
            ),
        ),
        **changes,  # type: ignore[arg-type]
    )


def test_a_full_queue_refuses_before_decoding_and_recovers() -> None:
    # the whole queue's bound, not one client's share of it
    running = start_server(_probe_settings(max_queue_images=2, client_queue_share=1.0))
    hold = factories.hold_probe(TAG)  # type: ignore[attr-defined]
    try:
        stub = running.stub()
        batcher = running.server.batcher
        computing = stub.Extract.future(_tensor_request(1.0), timeout=60)
        _until(lambda: any(1.0 in e["max"] for e in factories.probe_log(TAG)), "the first forward")
        queued = []
        for count, value in enumerate((2.0, 3.0), start=1):  # one at a time: the order is pinned
            queued.append(stub.Extract.future(_tensor_request(value), timeout=60))
            _until(lambda count=count: batcher.queued == count, f"{count} queued images")

        # the queue is full: an undecodable image is refused for room, not for its bytes
        with pytest.raises(grpc.RpcError) as info:
            stub.Extract(_encoded_request(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "queue is full" in (info.value.details() or "")
        # and so is a good photo: nothing of it was decoded or queued
        good = encode(photo("astronaut"))
        with pytest.raises(grpc.RpcError) as info:
            stub.Extract(_encoded_request(good), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert batcher.queued == 2 and batcher.load == 3  # one computing, two queued

        hold.set()
        for future in (computing, *queued):
            assert len(future.result(60).results) == 1
        # room again: the same two requests now get their own answers
        with pytest.raises(grpc.RpcError) as info:
            stub.Extract(_encoded_request(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert len(stub.Extract(_encoded_request(good), timeout=30).results) == 1
    finally:
        hold.set()
        running.stop()
    seen = [m for e in factories.probe_log(TAG) for m in e["max"]]
    assert seen[:3] == [1.0, 2.0, 3.0], seen  # the refused requests never reached the worker


def test_a_client_past_its_share_waits_its_turn_then_others_still_get_in() -> None:
    """One client may hold client_queue_share of the queue (here 1 image of 4), and while
    alone up to the queue less one share (3). Past that its next request waits client_wait_ms
    for its own images, then is refused (retryable), decoding nothing; another client's
    request is taken at once."""
    settings = _probe_settings(max_queue_images=4, client_queue_share=0.25, client_wait_ms=300)
    running = start_server(settings)
    hold = factories.hold_probe(TAG)  # type: ignore[attr-defined]
    other = grpc.insecure_channel(f"127.0.0.1:{running.port}")  # another connection
    try:
        stub = running.stub()
        batcher = running.server.batcher
        mine = [stub.Extract.future(_tensor_request(1.0), timeout=60)]
        _until(lambda: batcher.load == 1 and batcher.queued == 0, "the held forward")
        for count, value in enumerate((2.0, 3.0), start=1):
            mine.append(stub.Extract.future(_tensor_request(value), timeout=60))
            _until(lambda count=count: batcher.queued == count, f"{count} queued images")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Extract(_encoded_request(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), timeout=30)
        waited = time.monotonic() - started
        error = info.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "one client may hold 3 now" in (error.details() or "")  # not decoded: no INVALID
        assert ("layertap-retryable", "true") in tuple(error.trailing_metadata() or ())
        assert waited >= 0.3, waited  # it waited its turn first
        queued = pb_grpc.FeatureServiceStub(other).Extract.future(_tensor_request(4.0), timeout=60)
        _until(lambda: batcher.queued == 3, "the other client's image queued")
        hold.set()
        for future in (*mine, queued):
            assert len(future.result(60).results) == 1
    finally:
        hold.set()
        other.close()
        running.stop()
