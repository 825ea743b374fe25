"""GetServerInfo against a real server (every advertised capability is exercised, so the list
cannot drift from what Extract accepts), the retryable marker, and the new settings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, start_server
from factories import hold_probe, probe_log

from layertap.server.settings import ConfigError, MiB, ModelConfig, Settings, load_settings
from layertap.v1 import layertap_pb2 as pb

SIZE = 64
TINY = ModelConfig(
    name="tiny",
    factory="factories:tiny_net",
    kwargs={"width": 6},
    weights="none",
    allow_random=True,
    input_size=(SIZE, SIZE),
)
SETTINGS = Settings(
    port=0,
    log_level="ERROR",
    max_images_per_request=4,
    max_queue_images=3,
    max_stream_in_flight=5,
    max_parameter_bytes=7 * MiB,
    models=(
        TINY,
        ModelConfig(name="broken", factory="factories:no_such_factory"),
        ModelConfig(
            name="slow",
            factory="factories:probe_net",
            kwargs={"tag": "server-info-slow"},
            weights="none",
            allow_random=True,
            input_size=(SIZE, SIZE),
            max_batch_size=1,
            leaf_modules=("factories:Probe",),
        ),
    ),
)
PIXELS = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = start_server(SETTINGS)
    yield running
    running.stop()


def extract(server: RunningServer, image: pb.Image, **fields: object) -> pb.ExtractResponse:
    request = pb.ExtractRequest(model="tiny", images=[image], nodes=["pools"], **fields)
    return server.stub().Extract(request, timeout=60)  # type: ignore[no-any-return]


def test_server_info(server: RunningServer) -> None:
    stub = server.stub()
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert info.server_version and info.server_version == listed.server_version
    limits = info.limits
    assert (limits.max_stream_in_flight, limits.max_parameter_bytes) == (5, 7 * MiB)
    assert (limits.max_images_per_request, limits.max_queue_images) == (4, 3)
    assert limits.max_message_bytes == SETTINGS.max_message_bytes
    assert limits == listed.limits
    assert list(info.models) == ["tiny", "broken", "slow"]
    assert list(info.devices) == [listed.models[0].device] == ["cpu"]
    service = pb.DESCRIPTOR.services_by_name["FeatureService"]
    assert list(info.methods) == [m.name for m in service.methods]
    assert {"ExtractStream", "GetServerInfo", "GetParameters", "Compare"} <= set(info.methods)
    assert set(info.image_formats) == {"jpeg", "png", "webp", "gif", "bmp"}
    assert set(info.pools) == set(pb.Pooling.keys())
    assert set(info.input_dtypes) == {"uint8", "float32"}
    assert set(info.output_dtypes) == {"float32", "float16", "bfloat16", "int8"}
    assert list(info.heads) == []  # none configured here (test_descriptors_grpc has some)


def test_every_advertised_capability_works(server: RunningServer) -> None:
    info = server.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    for fmt in info.image_formats:
        response = extract(server, pb.Image(encoded=encode(PIXELS, fmt.upper())))
        assert list(response.results[0].outputs[0].tensor.shape) == [6, 8, 8], fmt
    raw = {
        "uint8": pb.Tensor(dtype="uint8", shape=[SIZE, SIZE, 3], data=PIXELS.tobytes()),
        "float32": pb.Tensor(
            dtype="float32", shape=[3, SIZE, SIZE], data=np.zeros((3, SIZE, SIZE), "f4").tobytes()
        ),
    }
    assert set(raw) == set(info.input_dtypes)
    for dtype in info.input_dtypes:
        extract(server, pb.Image(tensor=raw[dtype]))
    image = pb.Image(encoded=encode(PIXELS, "PNG"))
    for dtype in info.output_dtypes:
        # int8 is for L2-normalised pooled descriptors only
        pooled = {"pool": pb.POOLING_AVG, "normalize": True} if dtype == "int8" else {}
        response = extract(server, image, output=pb.OutputOptions(dtype=dtype, **pooled))
        assert response.results[0].outputs[0].tensor.dtype == dtype
    for name in info.pools:
        if name in ("POOLING_CLS", "POOLING_MEAN", "POOLING_CLS_MEAN"):  # tokens: not on NCHW
            with pytest.raises(grpc.RpcError) as err:
                extract(server, image, output=pb.OutputOptions(pool=pb.Pooling.Value(name)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown pool" not in err.value.details()
        else:
            extract(server, image, output=pb.OutputOptions(pool=pb.Pooling.Value(name)))


def _until(condition: Callable[[], bool], call: grpc.Future) -> None:
    """Wait for `condition`, failing with the call's error if it ended first."""
    give_up = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < give_up and not call.done(), call.exception()
        time.sleep(0.01)


def trailers(err: grpc.RpcError) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]


def test_retryable_marker_only_on_transient_failures(server: RunningServer) -> None:
    stub = server.stub()
    image = pb.Image(encoded=encode(PIXELS, "PNG"))

    def fails(request: pb.ExtractRequest, code: grpc.StatusCode) -> dict[str, str]:
        with pytest.raises(grpc.RpcError) as info:
            stub.Extract(request, timeout=60)
        assert info.value.code() == code, info.value.details()
        return trailers(info.value)

    # a full queue: the slow model is held inside one forward while three more images wait
    # (the queue's limit), so one more image is refused at once; and a model that is not available
    forwards = len(probe_log("server-info-slow"))  # the warm-up's
    hold = hold_probe("server-info-slow")
    try:
        busy = stub.Extract.future(
            pb.ExtractRequest(model="slow", images=[image], nodes=["mean"]), timeout=60
        )
        _until(lambda: len(probe_log("server-info-slow")) > forwards, busy)  # in that forward
        waiting = stub.Extract.future(
            pb.ExtractRequest(model="slow", images=[image] * 3, nodes=["mean"]), timeout=60
        )
        _until(lambda: server.server.batcher.queued == 3, waiting)
        full = fails(
            pb.ExtractRequest(model="slow", images=[image], nodes=["mean"]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert full.get("layertap-retryable") == "true" and full.get("x-request-id")
    finally:
        hold.set()
    busy.result()
    waiting.result()
    # a request bigger than the whole queue can never fit: a limit, not transient
    whole = fails(
        pb.ExtractRequest(model="tiny", images=[image] * 4, nodes=["pools"]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "layertap-retryable" not in whole
    unavailable = fails(
        pb.ExtractRequest(model="broken", images=[image], nodes=["x"]),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert unavailable.get("layertap-retryable") == "true"
    # limits and bad requests are not worth retrying as they are
    too_many = fails(  # over max_images_per_request=4
        pb.ExtractRequest(model="tiny", images=[image] * 5, nodes=["pools"]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "layertap-retryable" not in too_many and too_many.get("x-request-id")
    bad = fails(
        pb.ExtractRequest(model="tiny", images=[image], nodes=["nope"]),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "layertap-retryable" not in bad


def test_new_settings_from_flags_env_and_toml(tmp_path: Path) -> None:
    config = tmp_path / "layertap.toml"
    config.write_text("[server]\nmax_stream_in_flight = 3\nmax_parameter_bytes = 2048\n")
    s = load_settings(["--config", str(config)], env={})
    assert (s.max_stream_in_flight, s.max_parameter_bytes) == (3, 2048)
    s = load_settings(["--max-stream-in-flight", "9"], env={"LAYERTAP_MAX_PARAMETER_BYTES": "1000"})
    assert (s.max_stream_in_flight, s.max_parameter_bytes) == (9, 1000)
    assert load_settings([], env={}).max_parameter_bytes == 32 * MiB
    # unset, it follows a lowered message limit
    s = load_settings(["--max-message-bytes", str(8 * MiB)], env={})
    assert s.max_parameter_bytes == 7 * MiB
    with pytest.raises(ConfigError, match=r"max_parameter_bytes.*max_message_bytes"):
        load_settings(["--max-message-bytes", str(8 * MiB), "--max-parameter-bytes", str(8 * MiB)])
    with pytest.raises(ConfigError, match="max_stream_in_flight"):
        load_settings(["--max-stream-in-flight", "0"], env={})
