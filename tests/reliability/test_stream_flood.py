"""Idle and slow streams cannot starve unary calls or health probes.

The flood: idle grpc.health.v1.Health/Watch streams (open without a token while health is
open, more of them than the server's unary slots), slow ExtractStream and reflection streams
(one message each, then silent), from several connections. Meanwhile a normal client's
Health.Check, ListModels and an authenticated Extract must all succeed, and their latency is
measured (FLOOD_RESULT line, -s to see it). Before streams were counted apart, every stream took
one of `max_concurrent_rpcs` slots and the normal client got RESOURCE_EXHAUSTED.

Then each bound on its own: the server-wide streaming bound and the per-connection one refuse
with RESOURCE_EXHAUSTED naming their setting, the HTTP/2 stream limit of one connection holds
that connection's extra calls back without touching other connections, and a stream idle past
`stream_idle_timeout_s` is ended (UNAVAILABLE, retryable) while a busy one is not.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import RunningServer, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from layertap.server.app import channel_options
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

TOKEN = "flood-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SIZE = 32
TINY = ModelConfig(
    name="tiny",
    factory="factories:tiny_net",
    kwargs={"width": 4},
    weights="none",
    allow_random=True,
    input_size=(SIZE, SIZE),
)
UNARY_SLOTS = 16  # small, to keep the flood cheap: the old single bound of every RPC
CONNECTIONS = 4
WATCHES_PER_CONNECTION = 12  # 48 idle Watch streams: three times the unary slots
SLOW_STREAMS_PER_CONNECTION = 1  # one slow ExtractStream and one reflection stream each
CALLS = 60  # normal-client rounds (Check, ListModels, Extract each) measured under the flood
# The kubelet's gRPC probe gives up after timeoutSeconds, 1 s by default; a probe's p99 under
# the flood must stay well inside that on the loaded 2-core test machine.
PROBE_TIMEOUT_S = 1.0


def _settings(**changes: Any) -> Settings:
    base: dict[str, Any] = {
        "port": 0,
        "metrics": False,
        "warmup": False,
        "auth_tokens": TOKEN,
        "max_concurrent_rpcs": UNARY_SLOTS,
        "models": (TINY,),
    }
    return Settings(**{**base, **changes})


def _channel(running: RunningServer) -> grpc.Channel:
    """A channel on its own TCP connection (gRPC shares one between equal channels otherwise)."""
    options = [*channel_options(running.server.settings), ("grpc.use_local_subchannel_pool", 1)]
    return grpc.insecure_channel(running.target, options=options)


def _extract_request(value: float = 0.5) -> pb.ExtractRequest:
    x = np.full((1, 3, SIZE, SIZE), value, dtype=np.float32)
    tensor = pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes())
    return pb.ExtractRequest(model="tiny", nodes=["pools"], images=[pb.Image(tensor=tensor)])


class Held:
    """Streams kept open by the test; `close()` cancels them all and ends their iterators."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[Any] = []

    def requests(self, *first: Any) -> Iterator[Any]:
        """Send `first`, then nothing until released (an idle or slow client)."""
        yield from first
        self.release.wait(120)

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()


def _opened(call: Any, held: Held) -> grpc.StatusCode:
    """OK once the stream's first answer came (it is open on the server), else its status."""
    held.calls.append(call)
    try:
        next(call)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _open_watch(channel: grpc.Channel, held: Held) -> grpc.StatusCode:
    """An idle Watch: its first answer, then nothing (health does not change)."""
    stub = health_pb2_grpc.HealthStub(channel)
    return _opened(stub.Watch(health_pb2.HealthCheckRequest(), timeout=120), held)


def _open_slow_extract_stream(channel: grpc.Channel, held: Held) -> grpc.StatusCode:
    item = pb.ExtractStreamRequest(id="slow", request=_extract_request())
    stub = pb_grpc.FeatureServiceStub(channel)
    return _opened(stub.ExtractStream(held.requests(item), metadata=AUTH, timeout=120), held)


def _open_slow_reflection(channel: grpc.Channel, held: Held) -> grpc.StatusCode:
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return _opened(stub.ServerReflectionInfo(held.requests(ask), timeout=120), held)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def test_idle_and_slow_streams_do_not_starve_probes_or_unary_calls() -> None:
    running = start_server(_settings())
    held = Held()
    channels = [_channel(running) for _ in range(CONNECTIONS + 1)]
    try:
        opened: list[tuple[str, grpc.StatusCode]] = []
        for channel in channels[:CONNECTIONS]:
            for _ in range(SLOW_STREAMS_PER_CONNECTION):
                opened.append(("ExtractStream", _open_slow_extract_stream(channel, held)))
                opened.append(("ServerReflectionInfo", _open_slow_reflection(channel, held)))
            for _ in range(WATCHES_PER_CONNECTION):
                opened.append(("Watch", _open_watch(channel, held)))

        normal = channels[CONNECTIONS]
        health = health_pb2_grpc.HealthStub(normal)
        stub = pb_grpc.FeatureServiceStub(normal)
        latency: dict[str, list[float]] = {"Check": [], "ListModels": [], "Extract": []}
        calls = {
            "Check": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=30),
            "ListModels": lambda: stub.ListModels(
                pb.ListModelsRequest(), metadata=AUTH, timeout=30
            ),
            "Extract": lambda: stub.Extract(_extract_request(), metadata=AUTH, timeout=30),
        }
        for _ in range(CALLS):
            for name, call in calls.items():
                started = time.perf_counter()
                try:
                    call()
                except grpc.RpcError as exc:
                    pytest.fail(
                        f"{name} under the stream flood: {exc.code().name}: {exc.details()}"
                    )
                latency[name].append(time.perf_counter() - started)

        refused = [(what, code) for what, code in opened if code != grpc.StatusCode.OK]
        assert not refused, f"streams refused although within every stream bound: {refused}"
        figures = {
            "streams": len(opened),
            "connections": CONNECTIONS,
            "unary_slots": UNARY_SLOTS,
            **{
                f"{name}_p{q}_ms": round(_percentile(values, q) * 1000, 2)
                for name, values in latency.items()
                for q in (50, 99)
            },
        }
        print("FLOOD_RESULT " + json.dumps(figures))
        assert _percentile(latency["Check"], 99) < PROBE_TIMEOUT_S, figures
    finally:
        held.close()
        for channel in channels:
            channel.close()
        running.stop()


def _until(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def _refusal(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    return info.value


def _retryable(error: grpc.RpcError) -> bool:
    return ("layertap-retryable", "true") in tuple(error.trailing_metadata() or ())


def _check(channel: grpc.Channel, timeout: float = 30) -> Any:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=timeout
    )


def test_the_streaming_bound_refuses_streams_only() -> None:
    """max_streaming_rpcs full: a new stream of any kind is refused naming the setting (and
    marked retryable); probes, ListModels and Extract go on; a closed stream frees its slot."""
    running = start_server(_settings(max_streaming_rpcs=6, metrics=True, metrics_port=0))
    held = Held()
    a, b, normal = (_channel(running) for _ in range(3))
    gate = running.server.admission
    assert gate is not None
    try:
        for channel in (a, a, a, b, b, b):
            assert _open_watch(channel, held) == grpc.StatusCode.OK
        assert gate.streams == 6
        watch = health_pb2_grpc.HealthStub(b).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        error = _refusal(lambda: next(watch))
        assert "max_streaming_rpcs" in (error.details() or "") and _retryable(error)
        assert _open_slow_extract_stream(normal, held) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _open_slow_reflection(normal, held) == grpc.StatusCode.RESOURCE_EXHAUSTED

        stub = pb_grpc.FeatureServiceStub(normal)
        for _ in range(5):
            assert _check(normal).status == health_pb2.HealthCheckResponse.SERVING
            assert stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=30).models
            assert stub.Extract(_extract_request(), metadata=AUTH, timeout=30).results

        held.calls[0].cancel()
        _until(lambda: gate.streams == 5, "the cancelled stream's slot to come back")
        assert _open_slow_extract_stream(normal, held) == grpc.StatusCode.OK
        assert gate.refused["max_streaming_rpcs"] == 3
        # refusals are counted like any finished call, by method and status
        metrics = running.server.metrics
        assert metrics is not None
        exhausted = {"model": "unknown", "code": "RESOURCE_EXHAUSTED"}
        for method in ("Watch", "ExtractStream", "ServerReflectionInfo"):
            labels = {"method": method, **exhausted}
            value = metrics.registry.get_sample_value("layertap_requests_total", labels)
            assert value == 1, (method, value)
    finally:
        held.close()
        for channel in (a, b, normal):
            channel.close()
        running.stop()


def test_one_connection_holds_at_most_its_streams() -> None:
    """max_streaming_rpcs_per_connection: the connection at its limit is refused (naming the
    setting; not retryable: it is the client's own streams), another connection is not."""
    running = start_server(_settings(max_streaming_rpcs_per_connection=3))
    held = Held()
    a, b = _channel(running), _channel(running)
    gate = running.server.admission
    assert gate is not None
    try:
        assert _open_watch(a, held) == grpc.StatusCode.OK
        assert _open_slow_extract_stream(a, held) == grpc.StatusCode.OK
        assert _open_slow_reflection(a, held) == grpc.StatusCode.OK
        watch = health_pb2_grpc.HealthStub(a).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        error = _refusal(lambda: next(watch))
        details = error.details() or ""
        assert "max_streaming_rpcs_per_connection" in details and not _retryable(error), details
        assert _open_slow_extract_stream(a, held) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # unary calls on the same connection, and streams on another, are not affected
        assert _check(a).status == health_pb2.HealthCheckResponse.SERVING
        assert pb_grpc.FeatureServiceStub(a).Extract(_extract_request(), metadata=AUTH).results
        for _ in range(3):
            assert _open_watch(b, held) == grpc.StatusCode.OK
        assert sorted(gate.per_connection.values()) == [3, 3]
    finally:
        held.close()
        a.close()
        b.close()
        running.stop()


def test_http2_streams_per_connection_hold_back_only_that_connection() -> None:
    """max_streams_per_connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS): a connection with
    that many calls open gets no further call through (its client waits) until one ends;
    other connections are served meanwhile."""
    running = start_server(_settings(max_streams_per_connection=4))
    held = Held()
    a, b = _channel(running), _channel(running)
    try:
        for _ in range(4):
            assert _open_watch(a, held) == grpc.StatusCode.OK
        waiting = health_pb2_grpc.HealthStub(a).Check.future(
            health_pb2.HealthCheckRequest(), timeout=60
        )
        assert _check(b).status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.5)  # a held-back call stays held; had it gone through it would be done
        assert not waiting.done()
        held.calls[0].cancel()
        assert waiting.result(30).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        held.close()
        a.close()
        b.close()
        running.stop()


def test_unary_slots_full_leave_probes_and_streams_alone() -> None:
    """max_concurrent_rpcs full (one Extract held in the worker): another unary call is refused
    naming the setting, retryable; Health.Check is answered and a Watch still opens."""
    tag = "flood-unary"
    import factories

    probe = ModelConfig(
        name=tag,
        factory="factories:probe_net",
        kwargs={"tag": tag},
        weights="none",
        allow_random=True,
        input_size=(SIZE, SIZE),
        leaf_modules=("factories:Probe",),
    )
    running = start_server(_settings(max_concurrent_rpcs=1, models=(probe,)))
    hold = factories.hold_probe(tag)  # type: ignore[attr-defined]
    held = Held()
    a, b = _channel(running), _channel(running)
    try:
        stub = pb_grpc.FeatureServiceStub(a)
        request = _extract_request(1.0)
        request.model, request.nodes[:] = tag, ["mean"]
        busy = stub.Extract.future(request, metadata=AUTH, timeout=60)
        _until(lambda: factories.probe_log(tag), "the held forward")  # type: ignore[attr-defined]
        error = _refusal(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=AUTH))
        details = error.details() or ""
        assert "max_concurrent_rpcs" in details and _retryable(error), details
        assert _check(b).status == health_pb2.HealthCheckResponse.SERVING
        assert _open_watch(b, held) == grpc.StatusCode.OK
        hold.set()
        assert busy.result(60).results
        assert stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=30).models
    finally:
        hold.set()
        held.close()
        a.close()
        b.close()
        running.stop()


def test_idle_streams_are_ended_and_busy_ones_are_not() -> None:
    """stream_idle_timeout_s: a Watch with nothing to say and an ExtractStream left silent end
    with UNAVAILABLE (retryable, naming the setting) and give their slots back; an ExtractStream
    sending an item every 0.2 s runs past the timeout and ends OK."""
    idle_s = 1.0
    running = start_server(_settings(stream_idle_timeout_s=idle_s))
    held = Held()
    channel = _channel(running)
    gate = running.server.admission
    assert gate is not None
    try:
        started = time.monotonic()
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=20
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        item = pb.ExtractStreamRequest(id="x", request=_extract_request())
        silent = pb_grpc.FeatureServiceStub(channel).ExtractStream(
            held.requests(item), metadata=AUTH, timeout=20
        )
        held.calls.append(silent)
        assert next(silent).id == "x"

        def busy_items() -> Iterator[pb.ExtractStreamRequest]:
            for n in range(int(3 * idle_s / 0.2)):
                yield pb.ExtractStreamRequest(id=str(n), request=_extract_request())
                time.sleep(0.2)

        busy = pb_grpc.FeatureServiceStub(channel).ExtractStream(
            busy_items(), metadata=AUTH, timeout=20
        )
        for call in (watch, silent):
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            details = info.value.details() or ""
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, details
            assert "stream_idle_timeout_s" in details and _retryable(info.value), details
        assert time.monotonic() - started >= idle_s
        answers = list(busy)  # ends OK although it ran three timeouts long
        assert [a.id for a in answers] == [str(n) for n in range(len(answers))]
        assert len(answers) == int(3 * idle_s / 0.2)
        assert all(not a.HasField("error") for a in answers)
        _until(lambda: gate.streams == 0, "every stream's slot back")
    finally:
        held.close()
        channel.close()
        running.stop()
