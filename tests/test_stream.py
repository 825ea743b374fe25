"""ExtractStream against a real server: many tagged items, bad ones among them, flow control,
cancellation and auth. Answers are checked against unary Extract of the same inputs."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, start_server
from factories import probe_log

from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

SIZE = 64
LIMIT = 16  # max_stream_in_flight of the test server
PROBE = ("factories:Probe",)
METHOD = "/layertap.v1.FeatureService/ExtractStream"
RNG = np.random.default_rng(7)
IMAGES = [
    encode(RNG.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), fmt)
    for fmt in ("PNG", "JPEG", "PNG", "BMP", "PNG", "JPEG")
]
# (nodes, output options): items alternate between these
OPTIONS = [
    (["pools"], pb.OutputOptions()),
    (["stem.0"], pb.OutputOptions(pool=pb.POOLING_GEM, normalize=True)),
    (["head", "pools.1"], pb.OutputOptions(pool=pb.POOLING_MAX, dtype="float16")),
]


def probe_model(name: str, **kwargs: Any) -> ModelConfig:
    """A probe model (records every real batch) taking one image per forward. Its probe log
    is this module's own (tag "stream-<name>"): other modules' probes use the same names."""
    return ModelConfig(
        name=name,
        factory="factories:probe_net",
        kwargs={"tag": f"stream-{name}", **kwargs},
        weights="none",
        allow_random=True,
        input_size=(SIZE, SIZE),
        leaf_modules=PROBE,
        max_batch_size=1,
    )


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "port": 0,
        "max_stream_in_flight": LIMIT,
        "max_wait_ms": 2,
        "log_level": "ERROR",
        "models": (
            ModelConfig(
                name="tiny",
                factory="factories:tiny_net",
                kwargs={"width": 6},
                weights="none",
                allow_random=True,
                input_size=(SIZE, SIZE),
            ),
            probe_model("slow", delay_s=0.5),
            probe_model("paced", delay_s=0.05),
            probe_model("cancel-cancel", delay_s=0.3),
            probe_model("cancel-deadline", delay_s=0.3),
            probe_model("faulty", fail_above=100.0),
        ),
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = start_server(settings())
    yield running
    running.stop()


def extract_request(image: bytes, option: int, model: str = "tiny") -> pb.ExtractRequest:
    nodes, output = OPTIONS[option]
    return pb.ExtractRequest(
        model=model, images=[pb.Image(encoded=image)], nodes=nodes, output=output
    )


def raw_request(model: str, value: float) -> pb.ExtractRequest:
    """A float32 image filled with `value`, so a probe's log tells which item ran."""
    data = np.full((3, SIZE, SIZE), value, np.float32).tobytes()
    tensor = pb.Tensor(dtype="float32", shape=[3, SIZE, SIZE], data=data)
    return pb.ExtractRequest(model=model, images=[pb.Image(tensor=tensor)], nodes=["relu"])


def item(item_id: str, request: pb.ExtractRequest) -> bytes:
    return pb.ExtractStreamRequest(id=item_id, request=request).SerializeToString()


def raw_stream(channel: grpc.Channel) -> Callable[..., Iterator[pb.ExtractStreamResponse]]:
    """ExtractStream taking pre-serialised messages, so a test can send undecodable bytes."""
    return channel.stream_stream(  # type: ignore[no-any-return]
        METHOD,
        request_serializer=lambda b: b,
        response_deserializer=pb.ExtractStreamResponse.FromString,
    )


def metric(server: RunningServer, name: str, **labels: str) -> float:
    metrics = server.server.metrics
    assert metrics is not None
    return metrics.registry.get_sample_value(name, labels) or 0.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def worker_idle(server: RunningServer) -> bool:
    batcher = server.server.batcher
    return batcher.queued == 0 and not batcher._busy


def test_thousand_items_with_bad_ones(server: RunningServer) -> None:
    stub = server.stub()
    stream_rpcs = {"method": "ExtractStream", "model": "unknown", "code": "OK"}
    rpcs_before = metric(server, "layertap_requests_total", **stream_rpcs)
    ok_before = metric(server, "layertap_stream_items_total", model="tiny", code="OK")
    reference = {
        (i, o): stub.Extract(extract_request(image, o), timeout=60)
        for i, image in enumerate(IMAGES)
        for o in range(len(OPTIONS))
    }
    messages: list[bytes] = [
        # first, so the original is surely unanswered (a 0.5 s forward) when its twin is read
        item("dup", raw_request("slow", 0.5)),
        item("dup", extract_request(IMAGES[0], 0)),
    ]
    good: dict[str, tuple[int, int]] = {}
    bad: dict[str, tuple[grpc.StatusCode, str]] = {}
    empty_ids = undecodable = 0
    for n in range(1000):
        item_id = f"item-{n}"
        image, option = n % len(IMAGES), n % len(OPTIONS)
        request = extract_request(IMAGES[image], option)
        kind = n % 50
        if kind == 7:
            request.images[0].encoded = b"definitely not an image"
            bad[item_id] = (grpc.StatusCode.INVALID_ARGUMENT, "image 0")
        elif kind == 17:
            request.nodes[:] = ["no.such.node"]
            bad[item_id] = (grpc.StatusCode.INVALID_ARGUMENT, "DescribeModel")
        elif kind == 27:
            request.model = "no-such-model"
            bad[item_id] = (grpc.StatusCode.NOT_FOUND, "available: tiny")
        elif kind == 37:
            messages.append(item("", request))
            empty_ids += 1
            continue
        elif kind == 47:
            messages.append(b"\xff\xff\xff garbage, not a protobuf")
            undecodable += 1
            continue
        else:
            good[item_id] = (image, option)
        messages.append(item(item_id, request))

    answers = list(raw_stream(server.channel())(iter(messages), timeout=300))

    by_id: dict[str, list[pb.ExtractStreamResponse]] = {}
    for answer in answers:
        by_id.setdefault(answer.id, []).append(answer)
    assert len(answers) == len(messages)
    # the duplicate id: the original ran, its twin was refused, each answered once
    dup = sorted(by_id.pop("dup"), key=lambda a: a.WhichOneof("result"))
    assert [a.WhichOneof("result") for a in dup] == ["error", "response"]
    assert dup[0].error.code_name == "INVALID_ARGUMENT" and "unique" in dup[0].error.message
    assert dup[1].response.metadata.model == "slow"
    # empty ids and undecodable messages come back with an empty id
    empty = by_id.pop("")
    assert len(empty) == empty_ids + undecodable
    reasons = Counter("not a valid ExtractStreamRequest" in a.error.message for a in empty)
    assert reasons == {False: empty_ids, True: undecodable}
    for answer in empty:
        assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert set(by_id) == set(good) | set(bad)
    for item_id, (code, fragment) in bad.items():
        [answer] = by_id[item_id]
        assert answer.WhichOneof("result") == "error", item_id
        assert answer.error.code == code.value[0] and answer.error.code_name == code.name
        assert fragment in answer.error.message, answer.error.message
    for item_id, key in good.items():
        [answer] = by_id[item_id]
        assert answer.WhichOneof("result") == "response", answer.error.message
        got, want = answer.response, reference[key]
        assert [o.key for o in got.results[0].outputs] == [o.key for o in want.results[0].outputs]
        for g, w in zip(got.results[0].outputs, want.results[0].outputs, strict=True):
            assert (g.node, g.tensor.dtype, list(g.tensor.shape), g.tensor.layout) == (
                w.node,
                w.tensor.dtype,
                list(w.tensor.shape),
                w.tensor.layout,
            )
            dtype = np.float16 if g.tensor.dtype == "float16" else np.float32
            np.testing.assert_allclose(
                np.frombuffer(g.tensor.data, dtype),
                np.frombuffer(w.tensor.data, dtype),
                rtol=1e-3,
                atol=1e-5,
            )
    # the stream counted once as an RPC, and each item by outcome
    assert metric(server, "layertap_requests_total", **stream_rpcs) == rpcs_before + 1
    ok = metric(server, "layertap_stream_items_total", model="tiny", code="OK")
    assert ok == ok_before + len(good)
    not_found = metric(server, "layertap_stream_items_total", model="unknown", code="NOT_FOUND")
    assert not_found == sum(code == grpc.StatusCode.NOT_FOUND for code, _ in bad.values())


def test_in_flight_bound_holds_while_client_runs_ahead(server: RunningServer) -> None:
    count = 60  # on a model taking 50 ms per image, one at a time: the client gets ahead
    sent = 0
    ahead: list[int] = []
    name = "layertap_stream_unanswered_items"
    before = {le: metric(server, f"{name}_bucket", le=le) for le in ("8.0", "16.0", "+Inf")}

    def requests() -> Iterator[pb.ExtractStreamRequest]:
        nonlocal sent
        for n in range(count):
            sent += 1
            request = extract_request(IMAGES[n % 6], 0, model="paced")
            request.nodes[:] = ["relu"]
            yield pb.ExtractStreamRequest(id=str(n), request=request)

    received = 0
    for answer in server.stub().ExtractStream(requests(), timeout=300):
        assert answer.WhichOneof("result") == "response", answer.error.message
        received += 1
        ahead.append(sent - received)
    assert received == count
    after = {le: metric(server, f"{name}_bucket", le=le) for le in before}
    admitted = after["+Inf"] - before["+Inf"]
    assert admitted == count  # one observation per item admitted
    # never more than LIMIT unanswered on the server ...
    assert after["16.0"] - before["16.0"] == admitted
    # ... although the bound was reached (some items saw more than 8 unanswered) ...
    assert after["8.0"] - before["8.0"] < admitted
    # ... and the client had far more than LIMIT items sent ahead of the answers
    assert max(ahead) > 2 * LIMIT


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancel_drops_queued_items(server: RunningServer, how: str) -> None:
    model = f"cancel-{how}"
    total = 40

    def requests() -> Iterator[pb.ExtractStreamRequest]:
        for n in range(total):
            yield pb.ExtractStreamRequest(id=str(n), request=raw_request(model, n + 1.0))

    def counted(code: str) -> float:
        return metric(server, "layertap_stream_items_total", model=model, code=code)

    def admitted() -> float:
        return metric(server, "layertap_stream_unanswered_items_count")

    before = admitted()
    timeout = 1.0 if how == "deadline" else 60
    call = server.stub().ExtractStream(requests(), timeout=timeout)
    if how == "cancel":
        first = next(call)
        assert first.WhichOneof("result") == "response", first.error.message
        call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    expected = grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.code() == expected
    wait_for(
        lambda: metric(server, "layertap_requests_in_flight", method="ExtractStream") == 0,
        "the stream's teardown",
    )
    wait_for(lambda: worker_idle(server), "the worker to go idle")
    # the client was ahead: the server held a full window of items when the stream ended
    items = admitted() - before
    assert items >= LIMIT
    # every admitted item is accounted for: answered, or cancelled with the stream
    assert counted("OK") + counted("CANCELLED") == items
    assert counted("CANCELLED") >= items - 4
    # items carry values 1..total; the warm-up forward (zeros) is not one of them
    forwards = [e for e in probe_log(f"stream-{model}") if e["max"][0] >= 1]  # type: ignore[index]
    ran = sorted(int(event["max"][0]) for event in forwards)  # type: ignore[index]
    # at most the item running when the stream ended ran unanswered; the queued ones never ran
    assert len(forwards) <= counted("OK") + 1, ran


def test_unexpected_error_fails_only_its_item(server: RunningServer) -> None:
    values = [1.0, 500.0, 2.0, 3.0]  # the probe fails on inputs above 100: a "bug"
    requests = (
        pb.ExtractStreamRequest(id=f"v{v}", request=raw_request("faulty", v)) for v in values
    )
    answers = {a.id: a for a in server.stub().ExtractStream(requests, timeout=60)}
    assert set(answers) == {f"v{v}" for v in values}
    error = answers.pop("v500.0").error
    assert error.code_name == "INTERNAL" and "server bug" in error.message
    assert "injected" not in error.message  # internals stay in the log
    for answer in answers.values():
        assert answer.WhichOneof("result") == "response", answer.error.message


def test_empty_stream_ends_ok(server: RunningServer) -> None:
    assert list(server.stub().ExtractStream(iter(()), timeout=30)) == []


def test_stream_requires_the_bearer_token() -> None:
    running = start_server(settings(auth_tokens="s3cret", models=settings().models[:1]))
    try:
        stub = running.stub()

        def requests() -> Iterator[pb.ExtractStreamRequest]:
            for n in range(3):
                yield pb.ExtractStreamRequest(id=str(n), request=extract_request(IMAGES[0], 0))

        for metadata, code in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ExtractStream(requests(), timeout=30, metadata=metadata))
            assert info.value.code() == code
        assert metric(running, "layertap_stream_unanswered_items_count") == 0  # nothing ran
        good = (("authorization", "Bearer s3cret"),)
        answers = list(stub.ExtractStream(requests(), timeout=30, metadata=good))
        assert sorted(a.id for a in answers) == ["0", "1", "2"]
        assert all(a.WhichOneof("result") == "response" for a in answers)
    finally:
        running.stop()
