"""The SDK's one retry layer: which failures are retried, how often, and within the deadline.

A fake server fails the first N calls (or stream items) with a chosen status, with or without
the server's ``layertap-retryable: true`` mark, and counts every attempt it sees.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest

from layertap.client import AsyncFeatureClient, FeatureClient, FeatureServiceError, _retry
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def answer(request: pb.ExtractRequest) -> pb.ExtractResponse:
    results = []
    for image in request.images:
        value = float(np.frombuffer(image.tensor.data, np.uint8).mean())
        tensor = pb.Tensor(dtype="float32", shape=[1], data=np.array([value], "<f4").tobytes())
        results.append(pb.ImageResult(outputs=[pb.NamedTensor(key="n", node="n", tensor=tensor)]))
    return pb.ExtractResponse(results=results, metadata=pb.ExtractMetadata(model=request.model))


class FlakyServicer(pb_grpc.FeatureServiceServicer):
    """Fails the first ``fail_first`` Extract calls / stream items with ``code``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.configure(0, UNAVAILABLE)

    def configure(
        self,
        fail_first: int,
        code: grpc.StatusCode,
        marked: bool = False,
        item_message: str = "queue is full; retry later",
    ) -> None:
        self.fail_first, self.code, self.marked = fail_first, code, marked
        self.item_message = item_message
        self.calls = 0
        self.items = 0
        self.answered_images: list[float] = []

    def GetServerInfo(self, request: Any, context: Any) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(
            server_version="flaky",
            limits=pb.ServerLimits(max_images_per_request=8, max_stream_in_flight=16),
        )

    def Extract(self, request: pb.ExtractRequest, context: Any) -> pb.ExtractResponse:
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.fail_first
        if fail:
            if self.marked:
                context.set_trailing_metadata((("layertap-retryable", "true"),))
            context.abort(self.code, f"injected {self.code.name}")
        response = answer(request)
        with self.lock:
            self.answered_images += [
                float(np.frombuffer(r.outputs[0].tensor.data, "<f4")[0]) for r in response.results
            ]
        return response

    def ExtractStream(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        for item in request_iterator:
            with self.lock:
                self.items += 1
                fail = self.items <= self.fail_first
            if fail:
                error = pb.ItemError(
                    code=self.code.value[0], code_name=self.code.name, message=self.item_message
                )
                yield pb.ExtractStreamResponse(id=item.id, error=error)
            else:
                yield pb.ExtractStreamResponse(id=item.id, response=answer(item.request))


@pytest.fixture(scope="module")
def flaky() -> Iterator[tuple[FlakyServicer, str]]:
    servicer = FlakyServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_FeatureServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the real full-jitter formula but scale it down, so tests stay quick."""
    real = _retry.backoff_delay
    monkeypatch.setattr(_retry, "backoff_delay", lambda retry: real(retry) / 20)


IMAGE = np.full((2, 2, 3), 7, np.uint8)
REAL_BACKOFF = _retry.backoff_delay


@pytest.mark.parametrize(
    ("code", "marked", "retried"),
    [(UNAVAILABLE, False, True), (EXHAUSTED, True, True), (EXHAUSTED, False, False)],
)
def test_unary_retries_only_transient_failures(
    flaky: tuple[FlakyServicer, str], code: grpc.StatusCode, marked: bool, retried: bool
) -> None:
    servicer, target = flaky
    servicer.configure(2, code, marked)
    with FeatureClient(target, timeout=30, retries=4) as client:
        if retried:
            result = client.extract(IMAGE, model="m", nodes="n")
            assert float(result["n"][0, 0]) == 7
            assert servicer.calls == 3
        else:
            with pytest.raises(FeatureServiceError) as info:
                client.extract(IMAGE, model="m", nodes="n")
            assert info.value.code == EXHAUSTED and not info.value.retryable
            assert servicer.calls == 1  # a limit is never retried


def test_attempts_are_capped_at_retries_plus_one(flaky: tuple[FlakyServicer, str]) -> None:
    """No gRPC retry policy on the channel multiplies the SDK's attempts."""
    servicer, target = flaky
    for retries in (0, 1, 3):
        servicer.configure(100, UNAVAILABLE)
        with FeatureClient(target, timeout=30, retries=retries) as client:
            with pytest.raises(FeatureServiceError) as info:
                client.extract(IMAGE, model="m", nodes="n")
        assert info.value.code == UNAVAILABLE
        assert servicer.calls == retries + 1


def test_retry_loop_never_sleeps_past_the_deadline(
    flaky: tuple[FlakyServicer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer, target = flaky
    servicer.configure(1000, UNAVAILABLE)
    monkeypatch.setattr(_retry, "backoff_delay", lambda retry: 0.15)
    wakeups: list[float] = []
    real_sleep = time.sleep

    def recording_sleep(seconds: float) -> None:
        wakeups.append(time.monotonic() + seconds)
        real_sleep(seconds)

    monkeypatch.setattr(_retry.time, "sleep", recording_sleep)
    with FeatureClient(target, retries=10) as client:
        start = time.monotonic()
        with pytest.raises(FeatureServiceError) as info:
            client.extract(IMAGE, model="m", nodes="n", timeout=0.5)
    assert info.value.code == UNAVAILABLE
    assert wakeups and all(w < start + 0.5 for w in wakeups)
    assert servicer.calls == len(wakeups) + 1 < 11  # the deadline, not retries, ended it


def test_next_delay_rules() -> None:
    transient = FeatureServiceError(UNAVAILABLE, "x", retryable=True)
    limit = FeatureServiceError(EXHAUSTED, "too many images")
    assert _retry.next_delay(limit, 0, 4, None) is None
    assert _retry.next_delay(transient, 4, 4, None) is None
    delay = _retry.next_delay(transient, 0, 4, None)
    assert delay is not None and 0 <= delay <= _retry.INITIAL_BACKOFF_S / 20
    now = 100.0
    assert _retry.next_delay(transient, 0, 4, deadline=now + 1e-9, now=now) in (None, 0.0)


def test_full_jitter_bounds() -> None:
    assert REAL_BACKOFF(0, rng=lambda: 1.0) == pytest.approx(0.1)
    assert REAL_BACKOFF(3, rng=lambda: 1.0) == pytest.approx(0.8)
    assert REAL_BACKOFF(10, rng=lambda: 1.0) == pytest.approx(2.0)  # capped
    assert REAL_BACKOFF(5, rng=lambda: 0.0) == 0.0
    draws = [REAL_BACKOFF(2) for _ in range(200)]
    assert all(0 <= d <= 0.4 for d in draws) and len(set(draws)) > 100  # spread, not fixed


def test_error_classification() -> None:
    item = FeatureServiceError.from_item_error(8, "RESOURCE_EXHAUSTED", "queue full, retry")
    assert item.code == EXHAUSTED and item.retryable
    assert not FeatureServiceError.from_item_error(8, "RESOURCE_EXHAUSTED", "64 > 16").retryable
    assert FeatureServiceError.from_item_error(14, "UNAVAILABLE", "loading").retryable
    assert not FeatureServiceError.from_item_error(3, "INVALID_ARGUMENT", "retry").retryable


@pytest.mark.parametrize(
    ("message", "resent"),
    [("queue full; retry later", True), ("request has 9 images, limit 8", False)],
)
def test_stream_items_are_resent_when_transient(
    flaky: tuple[FlakyServicer, str], message: str, resent: bool
) -> None:
    servicer, target = flaky
    servicer.configure(5, EXHAUSTED, item_message=message)
    items = [np.full((2, 2, 3), i, np.uint8) for i in range(20)]
    with FeatureClient(target, timeout=30, retries=4) as client:
        out = list(client.extract_many(items, model="m", nodes="n", errors="yield", progress=False))
    assert [k for k, _ in out] == [str(i) for i in range(20)]
    failed = [k for k, r in out if isinstance(r, FeatureServiceError)]
    if resent:
        assert failed == [] and servicer.items == 25
        assert [float(r["n"][0, 0]) for _, r in out] == list(range(20))  # type: ignore[index]
    else:
        assert len(failed) == 5 and servicer.items == 20


def test_stream_item_retries_are_bounded(flaky: tuple[FlakyServicer, str]) -> None:
    servicer, target = flaky
    servicer.configure(1000, UNAVAILABLE)
    with FeatureClient(target, timeout=30, retries=2) as client:
        out = list(
            client.extract_many([IMAGE] * 3, model="m", nodes="n", errors="yield", progress=False)
        )
    assert all(isinstance(r, FeatureServiceError) and r.code == UNAVAILABLE for _, r in out)
    assert servicer.items == 3 * 3


def test_unary_bulk_calls_retry_transient_failures(flaky: tuple[FlakyServicer, str]) -> None:
    servicer, target = flaky
    servicer.configure(2, EXHAUSTED, marked=True)
    items = [np.full((2, 2, 3), i, np.uint8) for i in range(10)]
    with FeatureClient(target, timeout=30) as client:
        out = list(
            client.extract_many(
                items, model="m", nodes="n", transport="unary", concurrency=1, progress=False
            )
        )
    assert [float(r["n"][0, 0]) for _, r in out] == list(range(10))
    assert servicer.calls >= 3  # refused calls were made again
    assert sorted(servicer.answered_images) == list(range(10))  # each image answered once


async def test_async_client_retries(flaky: tuple[FlakyServicer, str]) -> None:
    servicer, target = flaky
    servicer.configure(2, UNAVAILABLE)
    async with AsyncFeatureClient(target, timeout=30, retries=2) as client:
        result = await client.extract(IMAGE, model="m", nodes="n")
        assert float(result["n"][0, 0]) == 7
        assert servicer.calls == 3
        servicer.configure(5, EXHAUSTED, marked=True)
        with pytest.raises(FeatureServiceError) as info:
            await client.extract(IMAGE, model="m", nodes="n")
        assert info.value.retryable and servicer.calls == 3


def test_pickled_error_keeps_retryable() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(FeatureServiceError(UNAVAILABLE, "x", retryable=True)))
    assert (error.code, error.details, error.retryable) == (UNAVAILABLE, "x", True)
