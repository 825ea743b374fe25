"""GetServerInfo against a real server (every advertised capability is exercised, so the list
cannot drift from what Extract accepts), the retryable marker, and the new settings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
    client_queue_share=1.0,  # these tests pin the whole queue's bound
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


def values(tensor: pb.Tensor) -> np.ndarray:
    """A response tensor as float32 numpy (little-endian wire; bfloat16 travels as its bits)."""
    if tensor.dtype == "bfloat16":
        bits = np.frombuffer(tensor.data, "<u2").astype(np.uint32) << 16
        flat = bits.view(np.float32)
    else:
        wire = {"float32": "<f4", "float16": "<f2", "int8": "i1"}[tensor.dtype]
        flat = np.frombuffer(tensor.data, wire).astype(np.float32)
    return flat.reshape(list(tensor.shape))


def first(response: pb.ExtractResponse) -> np.ndarray:
    assert len(response.results) == 1 and len(response.results[0].outputs) == 1
    return values(response.results[0].outputs[0].tensor)


def square_regions(m: int, levels: int) -> list[tuple[int, int, int]]:
    """docs/DESCRIPTORS.md's R-MAC grid on a square m x m map: (top, left, side)."""
    out = []
    for level in range(1, levels + 1):
        side = (2 * m) // (level + 1)
        half = int(np.floor(side / 2 - 1))
        step = 0.0 if level == 1 else (m - side) / (level - 1)
        starts = [int(np.floor(half + i * step)) - half for i in range(level)]
        out += [(top, left, side) for top in starts for left in starts]
    return out


def reference_pool(name: str, fmap: np.ndarray) -> np.ndarray:
    """The pools of one [C, H, W] map, written out in numpy (p = 3, eps = 1e-6, 3 levels)."""
    flat = fmap.reshape(fmap.shape[0], -1).astype(np.float64)

    def gem(x: np.ndarray) -> np.ndarray:
        return np.cbrt((np.clip(x, 1e-6, None) ** 3).mean(-1))

    def l2(v: np.ndarray) -> np.ndarray:
        return v / max(float(np.linalg.norm(v)), 1e-12)

    avg, top = flat.mean(-1), flat.max(-1)
    if name in ("POOLING_RMAC", "POOLING_RGEM"):
        pool = (lambda x: x.max(-1)) if name == "POOLING_RMAC" else gem
        assert fmap.shape[1] == fmap.shape[2]
        total = l2(pool(flat))
        for y, x, side in square_regions(fmap.shape[1], 3):
            region = fmap[:, y : y + side, x : x + side].reshape(fmap.shape[0], -1)
            total = total + l2(pool(region.astype(np.float64)))
        return l2(total)
    return {
        "POOLING_RAW": fmap.astype(np.float64),
        "POOLING_AVG": avg,
        "POOLING_MAX": top,
        "POOLING_GEM": gem(flat),
        "POOLING_AVGMAX": (avg + top) / 2,
        "POOLING_CATAVGMAX": np.concatenate([avg, top]),
    }[name]


def test_every_advertised_capability_works(server: RunningServer) -> None:
    info = server.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    # the reference for lossless inputs: the raw uint8 pixels
    pixels = pb.Tensor(dtype="uint8", shape=[SIZE, SIZE, 3], data=PIXELS.tobytes())
    fmap = first(extract(server, pb.Image(tensor=pixels)))
    assert fmap.shape == (6, 8, 8) and fmap.min() >= 0 and fmap.max() > 0  # ReLU, max-pools
    for fmt in info.image_formats:
        response = extract(server, pb.Image(encoded=encode(PIXELS, fmt.upper())))
        assert list(response.results[0].outputs[0].tensor.shape) == [6, 8, 8], fmt
        if fmt in ("png", "bmp"):  # lossless: exactly the pixels' features
            np.testing.assert_array_equal(first(response), fmap, err_msg=fmt)

    # float32 is taken as an already-normalised CHW tensor: the test's own forward of the
    # served weights (conv 3x3 pad 1 -> ReLU -> three 2x2 max-pools) on it is the answer
    params = server.stub().GetParameters(
        pb.GetParametersRequest(model="tiny", names=["stem.0"]), timeout=30
    )
    weights = {p.key: torch.from_numpy(values(p.tensor).copy()) for p in params.parameters}
    normalised = np.random.default_rng(4).standard_normal((3, SIZE, SIZE)).astype("f4")
    with torch.no_grad():
        y = F.relu(F.conv2d(torch.from_numpy(normalised)[None], *weights.values(), padding=1))
        expected = F.max_pool2d(F.max_pool2d(F.max_pool2d(y, 2), 2), 2)[0].numpy()
    assert list(weights) == ["stem.0.weight", "stem.0.bias"]
    raw = {
        "uint8": pixels,
        "float32": pb.Tensor(dtype="float32", shape=[3, SIZE, SIZE], data=normalised.tobytes()),
    }
    assert set(raw) == set(info.input_dtypes)
    answers = {"uint8": fmap, "float32": expected}
    for dtype in info.input_dtypes:
        got = first(extract(server, pb.Image(tensor=raw[dtype])))
        np.testing.assert_allclose(got, answers[dtype], rtol=1e-5, atol=1e-6, err_msg=dtype)

    image = pb.Image(encoded=encode(PIXELS, "PNG"))
    avg = fmap.mean((1, 2))
    unit = avg / np.linalg.norm(avg)
    close = {  # each output dtype against the float32 answer
        "float32": (fmap, 0.0),
        "float16": (fmap, 1e-3),
        "bfloat16": (fmap, 8e-3),
        "int8": (np.clip(np.round(127 * unit), -127, 127), 0.0),
    }
    assert set(close) == set(info.output_dtypes)
    for dtype in info.output_dtypes:
        # int8 is for L2-normalised pooled descriptors only
        pooled = {"pool": pb.POOLING_AVG, "normalize": True} if dtype == "int8" else {}
        response = extract(server, image, output=pb.OutputOptions(dtype=dtype, **pooled))
        assert response.results[0].outputs[0].tensor.dtype == dtype
        want, rtol = close[dtype]
        got = first(response)
        if dtype == "int8":  # round(127 x): a value on a rounding tie may land one step away
            assert np.abs(got - want).max() <= 1, (got, want)
            assert np.abs(got - want).sum() <= 1, (got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6, err_msg=dtype)
    for name in info.pools:
        if name in ("POOLING_CLS", "POOLING_MEAN", "POOLING_CLS_MEAN"):  # tokens: not on NCHW
            with pytest.raises(grpc.RpcError) as err:
                extract(server, image, output=pb.OutputOptions(pool=pb.Pooling.Value(name)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown pool" not in err.value.details()
        else:
            got = first(
                extract(server, image, output=pb.OutputOptions(pool=pb.Pooling.Value(name)))
            )
            want = reference_pool(name, fmap)
            assert got.shape == want.shape, name
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


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
