"""extract_many, automatic chunking, GetServerInfo and GetParameters of both clients.

First against a fake server that records what the client sends (window bound, lazy input,
call sizes), then end to end against the real in-process server with a tiny model.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, start_server

from layertap.client import AsyncFeatureClient, ExtractResult, FeatureClient, FeatureServiceError
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

# --------------------------------------------------------------------------- fake server


def value_of(image: pb.Image) -> float:
    """What the fake answers for an image: encoded length, or the pixel mean."""
    if image.WhichOneof("source") == "encoded":
        return float(len(image.encoded))
    return float(np.frombuffer(image.tensor.data, np.uint8).mean())


def is_bad(image: pb.Image) -> bool:
    return image.WhichOneof("source") == "encoded" and image.encoded.startswith(b"BAD")


def fake_response(request: pb.ExtractRequest) -> pb.ExtractResponse:
    results = []
    for image in request.images:
        data = np.array([value_of(image)], "<f4").tobytes()
        tensor = pb.Tensor(dtype="float32", shape=[1], data=data, layout="NC")
        results.append(pb.ImageResult(outputs=[pb.NamedTensor(key="n", node="n", tensor=tensor)]))
    meta = pb.ExtractMetadata(model=request.model, batch_size=len(request.images))
    return pb.ExtractResponse(results=results, metadata=meta)


class BulkServicer(pb_grpc.FeatureServiceServicer):
    """Answers Extract and ExtractStream, recording the most unanswered stream items, the
    size of every Extract call and the most concurrent calls. Reads the stream greedily, so
    a client that sent past its window would show up in ``max_outstanding``."""

    def __init__(self, limits: pb.ServerLimits, answer_delay: float = 0.002) -> None:
        self.limits = limits
        self.answer_delay = answer_delay
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.received = 0
            self.answered = 0
            self.max_outstanding = 0
            self.call_sizes: list[int] = []
            self.active_calls = 0
            self.max_active_calls = 0
            self.seen: Counter[float] = Counter()

    def GetServerInfo(self, request: Any, context: Any) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(server_version="fake-1", limits=self.limits)

    def Extract(self, request: pb.ExtractRequest, context: Any) -> pb.ExtractResponse:
        with self.lock:
            self.call_sizes.append(len(request.images))
            self.active_calls += 1
            self.max_active_calls = max(self.max_active_calls, self.active_calls)
            for image in request.images:
                self.seen[value_of(image)] += 1
        try:
            time.sleep(self.answer_delay)
            for i, image in enumerate(request.images):
                if is_bad(image):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image {i}: cannot decode")
            return fake_response(request)
        finally:
            with self.lock:
                self.active_calls -= 1

    def ExtractStream(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        inbox: queue.Queue[Any] = queue.Queue()

        def read() -> None:
            try:
                for item in request_iterator:
                    with self.lock:
                        self.received += 1
                        outstanding = self.received - self.answered
                        self.max_outstanding = max(self.max_outstanding, outstanding)
                        for image in item.request.images:
                            self.seen[value_of(image)] += 1
                    inbox.put(item)
            except grpc.RpcError:
                pass  # the client cancelled the stream
            inbox.put(None)

        threading.Thread(target=read, daemon=True).start()
        while (item := inbox.get()) is not None:
            time.sleep(self.answer_delay)
            if value_of(item.request.images[0]) == HELD:
                continue  # never answered: the client's per-item timeout must end it
            if is_bad(item.request.images[0]):
                error = pb.ItemError(code=3, code_name="INVALID_ARGUMENT", message="cannot decode")
                answer = pb.ExtractStreamResponse(id=item.id, error=error)
            else:
                answer = pb.ExtractStreamResponse(id=item.id, response=fake_response(item.request))
            with self.lock:
                self.answered += 1
            yield answer


class NoStreamServicer(BulkServicer):
    """An older server: no ExtractStream, no GetServerInfo (limits through ListModels)."""

    def ListModels(self, request: Any, context: Any) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(limits=self.limits, server_version="old")

    def GetServerInfo(self, request: Any, context: Any) -> pb.GetServerInfoResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        raise AssertionError

    def ExtractStream(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        raise AssertionError


def serve(servicer: pb_grpc.FeatureServiceServicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_FeatureServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


LIMITS = pb.ServerLimits(
    max_images_per_request=5,
    max_image_bytes=1000,
    max_message_bytes=1 << 20,
    max_stream_in_flight=64,
)


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[BulkServicer, str]]:
    servicer = BulkServicer(LIMITS)
    server, target = serve(servicer)
    yield servicer, target
    server.stop(grace=None)


HELD = 255.0


def gray(value: int) -> np.ndarray:
    return np.full((2, 2, 3), value, np.uint8)


def values(pairs: list[tuple[Any, Any]]) -> list[float]:
    return [float(r["n"][0, 0]) for _, r in pairs]


# --------------------------------------------------------------------------- fake: stream


@pytest.mark.parametrize(("in_flight", "window"), [(64, 8), (5, 5)])
def test_stream_never_has_more_than_the_window_unanswered(
    fake: tuple[BulkServicer, str], in_flight: int, window: int
) -> None:
    servicer, target = fake
    servicer.reset()
    servicer.limits = pb.ServerLimits(**{**_limits_dict(), "max_stream_in_flight": in_flight})
    try:
        with FeatureClient(target, timeout=30) as client:
            items = [gray(i % 200) for i in range(300)]
            out = list(
                client.extract_many(
                    items,
                    model="m",
                    nodes="n",
                    batch_size=4,
                    concurrency=2,
                    ordered=False,
                    progress=False,
                )
            )
    finally:
        servicer.limits = LIMITS
    assert sorted(int(k) for k, _ in out) == list(range(300))
    for key, result in out:
        assert result["n"].shape == (1, 1)
        assert float(result["n"][0, 0]) == int(key) % 200
    assert servicer.received == 300
    assert 2 <= servicer.max_outstanding <= window


def _limits_dict() -> dict[str, int]:
    return {f.name: getattr(LIMITS, f.name) for f in LIMITS.DESCRIPTOR.fields}


def test_lazy_input_is_read_only_as_far_as_the_window(fake: tuple[BulkServicer, str]) -> None:
    _, target = fake
    pulled = 0

    def generate() -> Iterator[np.ndarray]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield gray(i % 250)

    window = 2 * 3
    with FeatureClient(target, timeout=30) as client:
        results = client.extract_many(
            generate(), model="m", nodes="n", batch_size=3, concurrency=2, progress=False
        )
        seen = 0
        for _id, _result in results:
            seen += 1
            assert pulled - seen <= 2 * window
            if seen == 1:
                time.sleep(0.3)  # a slow consumer: the engine must not read on meanwhile
                assert pulled <= 2 * window + 1
            if seen == 50:
                break
        results.close()  # type: ignore[attr-defined]
    assert pulled < 100


def test_ordered_results_and_errors_yield(fake: tuple[BulkServicer, str]) -> None:
    _, target = fake
    items = [(f"id{i}", b"BAD" if i % 7 == 3 else gray(i)) for i in range(40)]
    with FeatureClient(target, timeout=30) as client:
        out = list(client.extract_many(items, model="m", nodes="n", errors="yield", progress=False))
    assert [k for k, _ in out] == [f"id{i}" for i in range(40)]
    for i, (_, result) in enumerate(out):
        if i % 7 == 3:
            assert isinstance(result, FeatureServiceError)
            assert result.code == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert isinstance(result, ExtractResult)
            assert float(result["n"][0, 0]) == i


def test_errors_raise_after_yielding_the_items_before(fake: tuple[BulkServicer, str]) -> None:
    _, target = fake
    items = [b"BAD" if i == 25 else gray(i) for i in range(200)]
    got: list[str] = []
    with FeatureClient(target, timeout=30) as client, pytest.raises(FeatureServiceError) as info:
        for key, _ in client.extract_many(items, model="m", nodes="n", progress=False):
            got.append(key)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert got == [str(i) for i in range(25)]


def test_local_failures_are_not_sent(fake: tuple[BulkServicer, str], tmp_path: Path) -> None:
    servicer, target = fake
    servicer.reset()
    big = b"\x89PNG" + b"x" * 2000  # over max_image_bytes=1000
    items = [gray(1), str(tmp_path / "missing.png"), big, np.zeros((2, 2), np.float64), gray(2)]
    with FeatureClient(target, timeout=30) as client:
        out = dict(client.extract_many(items, model="m", nodes="n", errors="yield", progress=False))
    assert isinstance(out["0"], ExtractResult) and isinstance(out["4"], ExtractResult)
    assert out["1"].code == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[union-attr]
    assert "missing.png" in out["1"].details  # type: ignore[union-attr]
    assert out["2"].code == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
    assert "max_image_bytes" in out["2"].details  # type: ignore[union-attr]
    assert out["3"].code == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[union-attr]
    assert servicer.received == 2  # only the two good images travelled
    assert float(len(big)) not in servicer.seen


def test_unanswered_stream_items_time_out(fake: tuple[BulkServicer, str]) -> None:
    """Items the server never answers fail DEADLINE_EXCEEDED after ``timeout``; when they
    fill the whole window the client opens a new stream and the rest still complete."""
    _, target = fake
    items = [gray(255) if i in (3, 4, 9) else gray(i) for i in range(15)]
    with FeatureClient(target, timeout=30) as client:
        out = list(
            client.extract_many(
                items,
                model="m",
                nodes="n",
                batch_size=1,
                concurrency=2,
                errors="yield",
                timeout=0.5,
                progress=False,
            )
        )
    assert [k for k, _ in out] == [str(i) for i in range(15)]
    for i, (_, result) in enumerate(out):
        if i in (3, 4, 9):
            assert isinstance(result, FeatureServiceError)
            assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            assert isinstance(result, ExtractResult) and float(result["n"][0, 0]) == i


def test_progress_bar_on_request(
    fake: tuple[BulkServicer, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, target = fake
    with FeatureClient(target, timeout=30) as client:
        assert (
            len(list(client.extract_many([gray(1)] * 5, model="m", nodes="n", progress=True))) == 5
        )
        assert "5/5" in capsys.readouterr().err
        list(client.extract_many([gray(1)] * 5, model="m", nodes="n"))  # not a TTY: no bar
        assert "5/5" not in capsys.readouterr().err


def test_bad_arguments_fail_at_the_call(fake: tuple[BulkServicer, str]) -> None:
    _, target = fake
    with FeatureClient(target) as client:
        for kwargs, error in [
            ({"batch_size": 0}, ValueError),
            ({"concurrency": -1}, ValueError),
            ({"transport": "http"}, ValueError),
            ({"errors": "ignore"}, ValueError),
            ({"priority": "urgent"}, ValueError),
            ({"pool": "median"}, ValueError),
        ]:
            with pytest.raises(error):
                client.extract_many([gray(1)], model="m", nodes="n", **kwargs)


# --------------------------------------------------------------------------- fake: unary


def test_unary_calls_are_sized_and_bounded(fake: tuple[BulkServicer, str]) -> None:
    servicer, target = fake
    servicer.reset()
    items = [gray(i) for i in range(100)]
    with FeatureClient(target, timeout=30) as client:
        out = list(
            client.extract_many(
                items,
                model="m",
                nodes="n",
                transport="unary",
                batch_size=8,
                concurrency=3,
                progress=False,
            )
        )
    assert values(out) == list(range(100))
    assert sum(servicer.call_sizes) == 100
    assert max(servicer.call_sizes) <= 5  # the server's max_images_per_request, under 8
    assert servicer.max_active_calls <= 3
    assert servicer.received == 0  # no stream was used


def test_unary_call_refused_for_one_image_is_split(fake: tuple[BulkServicer, str]) -> None:
    servicer, target = fake
    servicer.reset()
    items = [b"BAD" if i == 6 else gray(i) for i in range(12)]
    with FeatureClient(target, timeout=30) as client:
        out = list(
            client.extract_many(
                items,
                model="m",
                nodes="n",
                transport="unary",
                batch_size=4,
                concurrency=1,
                errors="yield",
                progress=False,
            )
        )
    failed = [k for k, r in out if isinstance(r, FeatureServiceError)]
    assert failed == ["6"]
    assert [float(r["n"][0, 0]) for k, r in out if k != "6"] == [i for i in range(12) if i != 6]
    assert 1 in servicer.call_sizes  # the refused call's images went again one by one


def test_stream_unimplemented_falls_back_to_unary() -> None:
    servicer = NoStreamServicer(LIMITS)
    server, target = serve(servicer)
    try:
        with FeatureClient(target, timeout=30) as client:
            info = client.server_info()
            assert (info.version, info.max_images_per_request) == ("old", 5)
            assert info.methods == ()
            out = list(
                client.extract_many(
                    [gray(i) for i in range(20)], model="m", nodes="n", progress=False
                )
            )
        assert values(out) == list(range(20))
        assert sum(servicer.call_sizes) == 20 and max(servicer.call_sizes) <= 5
    finally:
        server.stop(grace=None)


class UnaryOnlyServicer(BulkServicer):
    """Says through GetServerInfo that it has no ExtractStream."""

    def GetServerInfo(self, request: Any, context: Any) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(limits=self.limits, methods=["GetServerInfo", "Extract"])


def test_a_server_without_the_stream_method_gets_unary_calls() -> None:
    servicer = UnaryOnlyServicer(LIMITS)
    server, target = serve(servicer)
    try:
        with FeatureClient(target, timeout=30) as client:
            out = list(
                client.extract_many(
                    [gray(i) for i in range(12)], model="m", nodes="n", progress=False
                )
            )
        assert values(out) == list(range(12))
        assert servicer.received == 0 and sum(servicer.call_sizes) == 12
    finally:
        server.stop(grace=None)


# --------------------------------------------------------------------------- fake: async


async def test_async_extract_many_with_async_input(fake: tuple[BulkServicer, str]) -> None:
    _, target = fake

    async def generate() -> AsyncIterator[tuple[int, np.ndarray]]:
        for i in range(60):
            await asyncio.sleep(0)
            yield i, gray(i)

    async with AsyncFeatureClient(target, timeout=30) as client:
        for transport in ("stream", "unary"):
            out = [
                pair
                async for pair in client.extract_many(
                    generate(), model="m", nodes="n", transport=transport, progress=False
                )
            ]
            assert [k for k, _ in out] == list(range(60))
            assert values(out) == list(range(60))
        items = [gray(1), b"BAD", gray(3)]
        with pytest.raises(FeatureServiceError):
            async for _ in client.extract_many(items, model="m", nodes="n", progress=False):
                pass
        info = await client.get_server_info()
        assert info.max_stream_in_flight == 64


# --------------------------------------------------------------------------- real server

IMAGE_BYTES_LIMIT = 50_000


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        max_batch_size=8,
        max_wait_ms=2,
        max_images_per_request=4,
        max_image_bytes=IMAGE_BYTES_LIMIT,
        max_message_bytes=1_500_000,
        max_parameter_bytes=200_000,
        max_stream_in_flight=16,
        log_level="ERROR",
        models=(
            ModelConfig(
                name="tiny",
                factory="factories:tiny_net",
                kwargs={"width": 6},
                weights="none",
                allow_random=True,
                input_size=(64, 64),
            ),
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


def distinct_images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48 + 4 * i, 40 + 2 * i, 3), dtype=np.uint8) for i in range(n)]


def test_extract_many_1000_items_with_bad_ones_on_the_real_server(
    tiny_server: RunningServer, tmp_path: Path
) -> None:
    bases = distinct_images(10)
    oversized = encode(np.random.default_rng(1).integers(0, 256, (200, 200, 3), np.uint8), "PNG")
    assert len(oversized) > IMAGE_BYTES_LIMIT

    def items() -> Iterator[tuple[str, Any]]:
        for i in range(1000):
            if i % 97 == 5:
                yield f"img{i}", b"definitely not an image"
            elif i == 500:
                yield f"img{i}", tmp_path / "missing.jpg"
            elif i == 777:
                yield f"img{i}", oversized
            else:
                yield f"img{i}", bases[i % 10]

    bad = {f"img{i}" for i in range(1000) if i % 97 == 5 or i in (500, 777)}
    with FeatureClient(tiny_server.target, timeout=60) as client:
        reference = client.extract(bases, model="tiny", nodes=["head", "stem"], pool="avg")
        for transport in ("stream", "unary"):
            out = list(
                client.extract_many(
                    items(),
                    model="tiny",
                    nodes=["head", "stem"],
                    pool="avg",
                    errors="yield",
                    transport=transport,
                    progress=False,
                )
            )
            assert [k for k, _ in out] == [f"img{i}" for i in range(1000)]
            for key, result in out:
                i = int(key[3:])
                if key in bad:
                    assert isinstance(result, FeatureServiceError), key
                    expected = {500: "INVALID_ARGUMENT", 777: "RESOURCE_EXHAUSTED"}
                    assert result.code_name == expected.get(i, "INVALID_ARGUMENT")
                    continue
                assert isinstance(result, ExtractResult), (key, result)
                for node in ("head", "stem"):
                    assert result[node].shape == (1, *reference[node].shape[1:])
                    np.testing.assert_allclose(
                        result[node][0], reference[node][i % 10], rtol=1e-4, atol=1e-5
                    )


async def test_async_extract_many_on_the_real_server(tiny_server: RunningServer) -> None:
    bases = distinct_images(4)
    async with AsyncFeatureClient(tiny_server.target, timeout=60) as client:
        reference = await client.extract(bases, model="tiny", nodes="head")
        out = [
            pair
            async for pair in client.extract_many(
                (bases[i % 4] for i in range(64)),
                model="tiny",
                nodes="head",
                ordered=False,
                progress=False,
            )
        ]
    assert sorted(int(k) for k, _ in out) == list(range(64))
    for key, result in out:
        assert isinstance(result, ExtractResult)
        np.testing.assert_allclose(
            result["head"][0], reference["head"][int(key) % 4], rtol=1e-4, atol=1e-5
        )


def _count_calls(client: FeatureClient) -> list[int]:
    sizes: list[int] = []
    real = client._stub.Extract

    def counting(request: pb.ExtractRequest, **kwargs: Any) -> Any:
        sizes.append(len(request.images))
        return real(request, **kwargs)

    client._stub.Extract = counting  # type: ignore[method-assign]
    return sizes


def test_extract_splits_past_the_servers_limits(tiny_server: RunningServer) -> None:
    images = distinct_images(10)
    big = [np.random.default_rng(i).integers(0, 256, (400, 400, 3), np.uint8) for i in range(4)]
    with FeatureClient(tiny_server.target, timeout=60) as client:
        sizes = _count_calls(client)
        merged = client.extract(images, model="tiny", nodes={"head": "logits"})
        assert sizes == [4, 4, 2]  # max_images_per_request = 4
        assert merged["logits"].shape == (10, 4)
        assert merged.metadata.model == "tiny"
        for i, image in enumerate(images):
            alone = client.extract(image, model="tiny", nodes={"head": "logits"})
            np.testing.assert_allclose(
                merged["logits"][i], alone["logits"][0], rtol=1e-4, atol=1e-5
            )
            np.testing.assert_array_equal(merged.per_image[i]["logits"], merged["logits"][i])
        sizes.clear()
        # 4 images of 480 kB: within the image count, over the 1.5 MB message limit
        result = client.extract(big, model="tiny", nodes="head", priority="low")
        assert result["head"].shape == (4, 4)
        assert len(sizes) >= 2 and sum(sizes) == 4
        assert client.server_info().max_message_bytes == 1_500_000


def test_extract_refuses_an_encoded_image_over_the_limit_before_sending(
    tiny_server: RunningServer,
) -> None:
    too_big = b"\xff\xd8" + b"\0" * (IMAGE_BYTES_LIMIT + 10)
    with FeatureClient(tiny_server.target, timeout=60) as client:
        client.get_server_info()
        sizes = _count_calls(client)
        with pytest.raises(FeatureServiceError) as info:
            client.extract([distinct_images(1)[0], too_big], model="tiny", nodes="head")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "image 1" in info.value.details and "max_image_bytes" in info.value.details
    assert sizes == []


def test_server_info_and_parameters(tiny_server: RunningServer) -> None:
    with FeatureClient(tiny_server.target, timeout=60) as client:
        info = client.get_server_info()
        assert info.max_stream_in_flight == 16
        assert info.max_parameter_bytes == 200_000
        assert info.models == ("tiny",)
        assert {"ExtractStream", "GetParameters", "GetServerInfo"} <= set(info.methods)
        assert "POOLING_GEM" in info.pools and "float32" in info.output_dtypes
        params = client.get_parameters("tiny", ["stem.0"])
        assert list(params) == ["stem.0.weight", "stem.0.bias"]
        assert params["stem.0.weight"].shape == (6, 3, 3, 3)
        half = client.get_parameters("tiny", "stem.0.weight", dtype="float16")
        assert half["stem.0.weight"].dtype == np.float16
        np.testing.assert_allclose(half["stem.0.weight"], params["stem.0.weight"], atol=1e-3)
        with pytest.raises(FeatureServiceError) as err:
            client.get_parameters("tiny", "no.such.param")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ValueError):
            client.get_parameters("tiny", [])


async def test_async_parameters_and_native_resolution(tiny_server: RunningServer) -> None:
    image = distinct_images(1)[0]  # 48 x 40
    async with AsyncFeatureClient(tiny_server.target, timeout=60) as client:
        params = await client.get_parameters("tiny", "head.weight")
        assert params["head.weight"].shape == (4, 6)
        cropped = await client.extract(image, model="tiny", nodes="stem")
        native = await client.extract(image, model="tiny", nodes="stem", native_resolution=True)
    assert cropped["stem"].shape == (1, 6, 64, 64)
    assert native["stem"].shape == (1, 6, 48, 40)
