"""Every error status the API promises, each while a concurrent good request still succeeds."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, photo, start_server

from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb


def good_request(jpegs: dict[str, bytes]) -> pb.ExtractRequest:
    return pb.ExtractRequest(
        model="resnet18",
        images=[pb.Image(encoded=jpegs["astronaut"]), pb.Image(encoded=jpegs["chelsea"])],
        nodes=["layer3"],
        output=pb.OutputOptions(pool=pb.POOLING_GEM, normalize=True),
    )


def bomb_png(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims width x height (a decompression bomb)."""
    raw = encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return raw[:8] + patched + raw[8 + 25 :]


def run_with_neighbour(
    server: RunningServer, bad: pb.ExtractRequest, jpegs: dict[str, bytes]
) -> grpc.RpcError:
    """Fire good, bad, good concurrently; the good ones must succeed, return the bad one's error."""
    stub = server.stub()
    good1 = stub.Extract.future(good_request(jpegs), timeout=120)
    bad_call = stub.Extract.future(bad, timeout=120)
    good2 = stub.Extract.future(good_request(jpegs), timeout=120)
    for good in (good1, good2):
        response = good.result()
        assert len(response.results) == 2
        vec = np.frombuffer(response.results[0].outputs[0].tensor.data, np.float32)
        assert vec.shape == (256,) and abs(np.linalg.norm(vec) - 1) < 1e-4
    with pytest.raises(grpc.RpcError) as info:
        bad_call.result()
    return info.value


def expect(err: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> None:
    assert err.code() == code, (err.code(), err.details())
    for fragment in fragments:
        assert fragment in err.details(), err.details()


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (lambda r: r.images[1].ClearField("encoded"), ["image 1", "neither"]),
        (lambda r: setattr(r.images[1], "encoded", b"definitely not an image"), ["image 1"]),
        (lambda r: setattr(r.images[0], "encoded", encode(photo("coffee"))[:3000]), ["image 0"]),
        (
            lambda r: r.images[1].tensor.CopyFrom(
                pb.Tensor(dtype="uint8", shape=[4, 4, 3], data=b"\x00" * 47)
            ),
            ["image 1"],
        ),
        (
            lambda r: r.images[1].tensor.CopyFrom(
                pb.Tensor(dtype="int64", shape=[4, 4, 3], data=b"\x00" * 384)
            ),
            ["image 1"],
        ),
        (lambda r: r.ClearField("nodes"), ["no nodes"]),
        (lambda r: setattr(r.output, "dtype", "float64"), ["float64"]),
        (lambda r: setattr(r.output, "gem_p", float("nan")), ["gem_p"]),
        (lambda r: setattr(r.output, "pool", pb.POOLING_CLS), ["NLC"]),
        (lambda r: r.aliases.update({"layer3": "x", "layer2": "x"}), ["'x'"]),
        (lambda r: setattr(r, "model", ""), ["model is empty"]),
    ],
)
def test_invalid_argument(
    small_server: RunningServer, jpegs: dict[str, bytes], mutate: object, fragments: list[str]
) -> None:
    bad = good_request(jpegs)
    mutate(bad)  # type: ignore[operator]
    err = run_with_neighbour(small_server, bad, jpegs)
    expect(err, grpc.StatusCode.INVALID_ARGUMENT, *fragments)


def test_unknown_node_suggests_closest_names(
    small_server: RunningServer, jpegs: dict[str, bytes]
) -> None:
    bad = good_request(jpegs)
    del bad.nodes[:]
    bad.nodes.extend(["layer2("])  # would be a regex error inside torchvision
    err = run_with_neighbour(small_server, bad, jpegs)
    expect(
        err,
        grpc.StatusCode.INVALID_ARGUMENT,
        "layer2(",
        "closest valid names",
        "layer2",
        "DescribeModel",
    )
    bad.nodes[:] = ["layer3.1.conv9"]
    err = run_with_neighbour(small_server, bad, jpegs)
    expect(err, grpc.StatusCode.INVALID_ARGUMENT, "layer3.1.conv1")


def test_unknown_model_is_not_found(small_server: RunningServer, jpegs: dict[str, bytes]) -> None:
    bad = good_request(jpegs)
    bad.model = "resnet1000"
    err = run_with_neighbour(small_server, bad, jpegs)
    expect(err, grpc.StatusCode.NOT_FOUND, "resnet1000", "resnet18")
    with pytest.raises(grpc.RpcError) as info:
        small_server.stub().DescribeModel(pb.DescribeModelRequest(model="../../etc/passwd"))
    expect(info.value, grpc.StatusCode.NOT_FOUND)


def test_limits_are_resource_exhausted(
    small_server: RunningServer, jpegs: dict[str, bytes]
) -> None:
    too_many = good_request(jpegs)
    too_many.images.extend([pb.Image(encoded=jpegs["coffee"])] * 15)  # 17 > 16
    expect(
        run_with_neighbour(small_server, too_many, jpegs),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "max_images_per_request=16",
    )
    bomb = good_request(jpegs)
    bomb.images[1].encoded = bomb_png(100_000, 100_000)
    expect(
        run_with_neighbour(small_server, bomb, jpegs),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "image 1",
        "100000",
    )


@pytest.fixture(scope="module")
def tight_server(
    resnet18_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """Small limits, plus a model whose weights file is missing (never becomes ready)."""
    missing = tmp_path_factory.mktemp("w") / "missing.pth"
    settings = Settings(
        port=0,
        max_queue_images=6,  # two good neighbours + one bad request (2 images each) always fit
        client_queue_share=1.0,  # these tests pin the whole queue's bound
        max_image_bytes=300_000,
        max_message_bytes=1024 * 1024,
        models=(
            ModelConfig(name="resnet18", arch="resnet18", weights=str(resnet18_weights)),
            ModelConfig(name="broken", arch="resnet18", weights=str(missing)),
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


def test_tight_limits(tight_server: RunningServer, jpegs: dict[str, bytes]) -> None:
    big = good_request(jpegs)
    big.images[0].encoded = encode(photo("astronaut"), "PNG")  # ~ 500 kB > 300 kB
    expect(
        run_with_neighbour(tight_server, big, jpegs),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "image 0",
        "300000",
    )
    queue = good_request(jpegs)
    queue.images.extend([pb.Image(encoded=jpegs["coffee"])] * 5)  # 7 images > queue bound 6
    expect(
        run_with_neighbour(tight_server, queue, jpegs),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "max_queue_images=6",
    )
    raw = good_request(jpegs)
    raw.nodes[:] = ["layer1"]
    raw.output.pool = pb.POOLING_RAW  # 2 x 64x56x56 float32 = 1.6 MB > 1 MiB
    expect(
        run_with_neighbour(tight_server, raw, jpegs),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "max_message_bytes",
    )


def test_model_that_failed_to_load_is_unavailable(
    tight_server: RunningServer, jpegs: dict[str, bytes]
) -> None:
    bad = good_request(jpegs)
    bad.model = "broken"
    err = run_with_neighbour(tight_server, bad, jpegs)
    expect(err, grpc.StatusCode.UNAVAILABLE, "broken", "does not exist")
    models = {m.name: m for m in tight_server.stub().ListModels(pb.ListModelsRequest()).models}
    assert models["resnet18"].ready and not models["broken"].ready
    assert "does not exist" in models["broken"].status_message


def test_input_the_model_cannot_take_is_invalid_not_internal(
    small_server: RunningServer, jpegs: dict[str, bytes]
) -> None:
    tiny = np.zeros((1, 3, 4, 4), np.float32)  # three 2x2 max-pools need at least 8x8
    bad = pb.ExtractRequest(
        model="tiny",
        nodes=["pools"],
        images=[
            pb.Image(tensor=pb.Tensor(dtype="float32", shape=[1, 3, 4, 4], data=tiny.tobytes()))
        ],
    )
    err = run_with_neighbour(small_server, bad, jpegs)
    expect(err, grpc.StatusCode.INVALID_ARGUMENT, "4x4", "64x64")
    ok = small_server.stub().Extract(
        pb.ExtractRequest(
            model="tiny", nodes=["stem.0", "pools"], images=[pb.Image(encoded=jpegs["china"])]
        )
    )
    assert [tuple(o.tensor.shape) for o in ok.results[0].outputs] == [(6, 64, 64), (6, 8, 8)]


def test_server_keeps_serving_after_garbage(
    small_server: RunningServer, jpegs: dict[str, bytes]
) -> None:
    stub = small_server.stub()
    rng = np.random.default_rng(0)
    for _ in range(20):
        junk = pb.ExtractRequest(
            model="resnet18",
            nodes=["layer1"],
            images=[pb.Image(encoded=rng.bytes(int(rng.integers(1, 2000))))],
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.Extract(junk, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(stub.Extract(good_request(jpegs), timeout=60).results) == 2


def test_concurrent_rpcs_beyond_the_bound_are_resource_exhausted(
    resnet18_weights: Path, jpegs: dict[str, bytes]
) -> None:
    """max_concurrent_rpcs: the excess unary calls are refused at once (server/admission.py),
    the rest are served."""
    settings = Settings(
        port=0,
        metrics=False,
        max_concurrent_rpcs=2,
        models=(ModelConfig(name="resnet18", arch="resnet18", weights=str(resnet18_weights)),),
    )
    running = start_server(settings)
    try:
        stub = running.stub()
        request = good_request(jpegs)
        request.images.extend([pb.Image(encoded=jpegs["coffee"])] * 6)  # slow enough to overlap
        calls = [stub.Extract.future(request, timeout=120) for _ in range(8)]
        codes = []
        for call in calls:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert grpc.StatusCode.OK in codes
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(stub.Extract(good_request(jpegs), timeout=60).results) == 2
    finally:
        running.stop()
