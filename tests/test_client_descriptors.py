"""Descriptor options of the SDK and the CLI (issue 4) against a fake server that records
every request: the exact OutputOptions / Image.regions sent for each option, post-step
parsing, local validation, regions staying with their image when a call is split, int8
decoding, and per-image lists when the number of regions differs between images.

The fake answers each image with rows ``[value, x1, y1, x2, y2]`` (one per region, or one
``[value, 0, 0, 0, 0]`` without regions), so a region that travelled with the wrong image or
in the wrong order shows up in the numbers.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from layertap.client import (
    AsyncFeatureClient,
    ExtractResult,
    FeatureClient,
    HeadInfo,
)
from layertap.client._requests import build_extract_request
from layertap.client.cli import main
from layertap.common.option_parsing import (
    build_output_options,
    parse_post,
    parse_post_step,
    parse_regions,
    parse_tta,
)
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

OP = pb.PostStep
HEADS = [
    pb.HeadInfo(name="gl18", model="fake", input_dim=2048, components=512,
                nodes=["layer4"], pool="gem"),
    pb.HeadInfo(name="any", model="", input_dim=64, components=64),
]  # fmt: skip


def image_value(image: pb.Image) -> float:
    if image.WhichOneof("source") == "encoded":
        return float(len(image.encoded))
    return float(np.frombuffer(image.tensor.data, np.uint8).mean())


def rows_for(image: pb.Image) -> np.ndarray:
    """What the fake answers for one image: [R, 5] with regions, else [5]."""
    value = image_value(image)
    if not image.regions:
        return np.array([value, 0, 0, 0, 0], np.float32)
    return np.array([[value, b.x1, b.y1, b.x2, b.y2] for b in image.regions], np.float32)


def answer(request: pb.ExtractRequest) -> pb.ExtractResponse:
    out = request.output
    if out.concat:
        keys = [out.concat_key or "descriptor"]
    else:
        keys = [request.aliases.get(n, n) for n in request.nodes]
    dtype = out.dtype or "float32"
    results = []
    for image in request.images:
        rows = rows_for(image)
        if dtype == "int8":
            data = np.clip(np.round(rows), -127, 127).astype(np.int8).tobytes()
        else:
            data = rows.astype("<f4").tobytes()
        tensor = pb.Tensor(dtype=dtype, shape=list(rows.shape), data=data, layout="NC")
        outputs = [pb.NamedTensor(key=k, node=k, tensor=tensor) for k in keys]
        results.append(pb.ImageResult(outputs=outputs))
    meta = pb.ExtractMetadata(model=request.model, batch_size=len(request.images))
    return pb.ExtractResponse(results=results, metadata=meta)


class RecordingServicer(pb_grpc.FeatureServiceServicer):
    """Records every ExtractRequest (unary, or each stream item's) and answers it."""

    def __init__(self) -> None:
        self.requests: list[pb.ExtractRequest] = []

    def GetServerInfo(self, request: Any, context: Any) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(
            server_version="fake",
            limits=pb.ServerLimits(max_images_per_request=2, max_message_bytes=64 << 20,
                                   max_stream_in_flight=4),
            methods=["Extract", "ExtractStream", "GetServerInfo"],
            pools=list(pb.Pooling.keys()),
            output_dtypes=["float32", "float16", "bfloat16", "int8"],
            heads=HEADS,
        )  # fmt: skip

    def Extract(self, request: pb.ExtractRequest, context: Any) -> pb.ExtractResponse:
        self.requests.append(request)
        return answer(request)

    def ExtractStream(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        for item in request_iterator:
            self.requests.append(item.request)
            yield pb.ExtractStreamResponse(id=item.id, response=answer(item.request))


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[RecordingServicer, str]]:
    servicer = RecordingServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FeatureServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def recorder(fake: tuple[RecordingServicer, str]) -> RecordingServicer:
    fake[0].requests.clear()
    return fake[0]


@pytest.fixture
def client(fake: tuple[RecordingServicer, str]) -> Iterator[FeatureClient]:
    with FeatureClient(fake[1], timeout=10) as c:
        yield c


def img(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, np.uint8)


# --------------------------------------------------------------------------- post parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("l2", OP(op=OP.OP_L2)),
        ("L2", OP(op=OP.OP_L2)),
        ("power", OP(op=OP.OP_POWER, alpha=0.5)),
        ("power:0.25", OP(op=OP.OP_POWER, alpha=0.25)),
        ("power:1", OP(op=OP.OP_POWER, alpha=1.0)),
        ("center:gl18", OP(op=OP.OP_CENTER, head="gl18")),
        ("pca:gl18", OP(op=OP.OP_PCA, head="gl18")),
        ("pca:gl18:128", OP(op=OP.OP_PCA, head="gl18", dim=128)),
        ("whiten:gl18", OP(op=OP.OP_WHITEN, head="gl18")),
        ("whiten:gl18:256", OP(op=OP.OP_WHITEN, head="gl18", dim=256)),
        ({"op": "whiten", "head": "gl18", "dim": 64}, OP(op=OP.OP_WHITEN, head="gl18", dim=64)),
        ({"op": "power", "alpha": 0.3}, OP(op=OP.OP_POWER, alpha=0.3)),
        ({"op": "power"}, OP(op=OP.OP_POWER, alpha=0.5)),
        ({"op": "pca", "head": "h", "dim": 0}, OP(op=OP.OP_PCA, head="h")),
    ],
)
def test_post_steps_parse(text: Any, expected: pb.PostStep) -> None:
    step = parse_post_step(text)
    assert step.op == expected.op and step.head == expected.head and step.dim == expected.dim
    assert step.alpha == pytest.approx(expected.alpha)


@pytest.mark.parametrize(
    ("step", "match"),
    [
        ("median", "cannot read post step 'median'"),
        ("l2:x", "cannot read post step 'l2:x'"),
        ("power:2", r"alpha must be in \(0, 1\]"),
        ("power:0", r"alpha must be in \(0, 1\]"),
        ("power:abc", "power alpha must be a number"),
        ("power:nan", "must be finite"),
        ("pca", "cannot read post step 'pca'.*'pca:HEAD'"),
        ("pca:", "needs a head name"),
        ("pca:h:0", "dim must be at least 1"),
        ("pca:h:x", "pca dim must be a non-negative integer"),
        ("whiten:h:-3", "whiten dim must be a non-negative integer"),
        ("center:h:12", "cannot read post step 'center:h:12'"),
        ("whiten:h:1:2", "cannot read post step"),
        ({"op": "l2", "head": "h"}, "takes no head"),
        ({"op": "center", "head": "h", "dim": 3}, "takes no dim"),
        ({"op": "pca", "alpha": 0.5, "head": "h"}, "takes no alpha"),
        ({"op": "pca"}, "needs a head name"),
        ({"head": "h"}, "has no 'op'"),
        ({"op": "l2", "size": 1}, r"unknown keys \['size'\]"),
        ({"op": "zca", "head": "h"}, "unknown post op 'zca'"),
        ({"op": "pca", "head": "h", "dim": True}, "non-negative integer"),
    ],
)
def test_bad_post_steps_say_what_to_write(step: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_post_step(step)


def test_post_lists_name_the_bad_position() -> None:
    assert [s.op for s in parse_post(["l2", "whiten:h", {"op": "l2"}])] == [
        OP.OP_L2, OP.OP_WHITEN, OP.OP_L2]  # fmt: skip
    assert [s.op for s in parse_post("power")] == [OP.OP_POWER]  # one step alone
    assert parse_post(None) == [] and parse_post([]) == []
    with pytest.raises(ValueError, match=r"post\[1\]: cannot read post step 'wihten:h'"):
        parse_post(["l2", "wihten:h"])
    with pytest.raises(TypeError, match=r"post\[0\]"):
        parse_post([3, "l2"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="post must be"):
        parse_post(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- local validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pool": None, "dtype": "int8", "normalize": True}, ValueError, "pick a pool"),
        ({"pool": "gem", "dtype": "int8"}, ValueError, "L2-normalised"),
        ({"pool": "gem", "dtype": "int8", "post": ["l2", "center:h"]}, ValueError, "L2-normalised"),
        (
            {"pool": "gem", "dtype": "int8", "concat": True, "post": ["center:h"]},
            ValueError,
            "L2-normalised",
        ),
        ({"pool": None, "concat": True}, ValueError, "concat works on pooled"),
        ({"pool": "raw", "tta": "flip"}, ValueError, "tta works on pooled"),
        ({"pool": None, "post": "l2"}, ValueError, "post works on pooled"),
        ({"pool": "gem", "concat_key": "d"}, ValueError, "pass concat=True"),
        ({"pool": "gem", "concat": True, "concat_key": ""}, ValueError, "non-empty"),
        ({"pool": "gem", "concat": 1}, TypeError, "concat must be a bool"),
        ({"pool": "gem", "rmac_levels": 2}, ValueError, "'rmac' or 'rgem' only"),
        ({"pool": "rmac", "rmac_levels": -1}, ValueError, "rmac_levels must be"),
        ({"pool": "gem", "roi_size": 2.5}, ValueError, "roi_size must be"),
        ({"pool": "gem", "tta": "mirror"}, ValueError, "tta must be None, 'flip'"),
        ({"pool": "gem", "tta": True}, TypeError, "tta must be"),
        ({"pool": "gem", "tta": {"flip": "yes"}}, TypeError, "'flip' must be a bool"),
        ({"pool": "gem", "tta": {"scale": [1]}}, ValueError, r"unknown keys \['scale'\]"),
        ({"pool": "gem", "tta": {"scales": [1, 0]}}, ValueError, "positive"),
        ({"pool": "gem", "tta": {"scales": "1,0.5"}}, ValueError, "list of numbers"),
        ({"pool": "median"}, ValueError, "unknown pool 'median'"),
        ({"pool": "gem", "dtype": "int16"}, ValueError, "unknown dtype"),
    ],
)
def test_bad_descriptor_options_fail_locally(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        build_output_options(**kwargs)


def test_int8_is_accepted_when_descriptors_are_normalised() -> None:
    for kwargs in (
        {"normalize": True},
        {"concat": True},
        {"post": ["l2"]},
        {"post": "power:0.3"},
        {"post": ["center:h", "pca:h:8"]},
        {"post": ["whiten:h"]},
        {"post": ["center:h"], "normalize": True},
    ):
        assert build_output_options(pool="gem", dtype="int8", **kwargs).dtype == "int8"


@pytest.mark.parametrize(
    ("regions", "n", "error", "match"),
    [
        ([[(0, 0, 4, 4)]], 2, ValueError, "1 entries for 2 image"),
        ([(0, 0, 4, 4)], 1, ValueError, "one box .* not a list of boxes"),
        ([[(4, 0, 2, 4)]], 1, ValueError, r"box 0 \[4.0, 0.0, 2.0, 4.0\] is empty"),
        ([[(0, 0, 4, 4), (0, 5, 4, 5)]], 1, ValueError, "box 1 .* is empty"),
        ([[(0, 0, float("nan"), 4)]], 1, ValueError, "non-finite"),
        ([np.zeros((2, 3))], 1, ValueError, r"shape \[R, 4\]"),
        ([[(0, 0, 4)]], 1, ValueError, r"shape \[R, 4\]"),
        ([None, [("a", 0, 4, 4)]], 2, ValueError, r"regions\[1\]"),
        ([{"x1": 0}], 1, TypeError, "list of"),
        ({"a": 1}, 1, TypeError, "one entry per image"),
    ],
)
def test_bad_regions_fail_locally(regions: Any, n: int, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parse_regions(regions, n)


def test_regions_forms() -> None:
    boxes = parse_regions(
        [None, [], [(1, 2, 3, 4)], np.array([[0, 0, 5, 5], [1.5, 2, 8, 9]], np.float32)], 4
    )
    assert boxes is not None
    assert [len(b) for b in boxes] == [0, 0, 1, 2]
    assert boxes[3][1] == pb.Box(x1=1.5, y1=2, x2=8, y2=9)
    assert parse_regions(None, 3) is None


def test_tta_forms() -> None:
    assert parse_tta(None) is None
    assert parse_tta("flip") == pb.TestTimeAugmentation(flip=True)
    tta = parse_tta({"flip": False, "scales": np.array([1, 0.5])})
    assert tta is not None and not tta.flip and list(tta.scales) == [1.0, 0.5]


# --------------------------------------------------------------------------- request fields


def test_every_option_travels_exactly(client: FeatureClient, recorder: RecordingServicer) -> None:
    client.extract(
        img(1), model="fake", nodes=["layer3", "layer4"], pool="gem", gem_p=4.0,
        post=["power:0.3", "whiten:gl18:128", {"op": "l2"}], concat=True,
        concat_key="desc", tta={"flip": True, "scales": [1, 0.7071, 0.5]}, dtype="int8",
    )  # fmt: skip
    client.extract(img(2), model="fake", nodes="layer4", pool="rmac", rmac_levels=4)
    client.extract(img(3), model="fake", nodes="layer4", pool="avg", tta="flip",
                   regions=[[(1, 2, 30, 40)]], roi_size=5)  # fmt: skip
    first, second, third = recorder.requests
    assert first.output == pb.OutputOptions(
        pool=pb.POOLING_GEM, gem_p=4.0, dtype="int8",
        post=[OP(op=OP.OP_POWER, alpha=0.3), OP(op=OP.OP_WHITEN, head="gl18", dim=128),
              OP(op=OP.OP_L2)],
        concat=True, concat_key="desc",
        tta=pb.TestTimeAugmentation(flip=True, scales=[1, 0.7071, 0.5]),
    )  # fmt: skip
    assert list(first.nodes) == ["layer3", "layer4"] and not first.images[0].regions
    assert second.output == pb.OutputOptions(
        pool=pb.POOLING_RMAC, gem_p=3.0, dtype="float32", rmac_levels=4
    )
    assert third.output == pb.OutputOptions(
        pool=pb.POOLING_AVG, gem_p=3.0, dtype="float32", roi_size=5,
        tta=pb.TestTimeAugmentation(flip=True),
    )  # fmt: skip
    assert list(third.images[0].regions) == [pb.Box(x1=1, y1=2, x2=30, y2=40)]
    # defaults add nothing: a plain call's options are what an older client sent
    recorder.requests.clear()
    client.extract(img(4), model="fake", nodes="x", pool="max")
    assert recorder.requests[0].output == pb.OutputOptions(
        pool=pb.POOLING_MAX, gem_p=3.0, dtype="float32"
    )


@pytest.mark.parametrize(
    ("pool", "enum"),
    [("avgmax", pb.POOLING_AVGMAX), ("catavgmax", pb.POOLING_CATAVGMAX),
     ("rmac", pb.POOLING_RMAC), ("RGeM", pb.POOLING_RGEM), ("cls_mean", pb.POOLING_CLS_MEAN),
     ("cls+mean", pb.POOLING_CLS_MEAN)],
)  # fmt: skip
def test_new_pool_names(
    client: FeatureClient, recorder: RecordingServicer, pool: str, enum: pb.Pooling
) -> None:
    client.extract(img(1), model="fake", nodes="n", pool=pool)
    assert recorder.requests[-1].output.pool == enum


def test_concat_result_has_one_key(client: FeatureClient) -> None:
    result = client.extract([img(1), img(2)], model="fake", nodes=["layer3", "layer4"],
                            pool="gem", concat=True)  # fmt: skip
    assert list(result) == ["descriptor"]
    assert result.array("descriptor").shape == (2, 5)


# --------------------------------------------------------------------------- regions


REGIONS: list[Any] = [
    [(0, 0, 4, 4)],
    np.array([[1, 1, 5, 5], [2, 2, 6, 6], [3, 3, 7, 7]], np.float32),
    None,
    [(4, 4, 8, 8), (0, 1, 2, 3)],
    [],
]


def _expected(value: int, boxes: Any) -> np.ndarray:
    """The fake's answer for an image of ``value`` sent with ``boxes``."""
    if boxes is None or len(boxes) == 0:
        return np.array([value, 0, 0, 0, 0])
    return np.concatenate([np.full((len(boxes), 1), value), np.asarray(boxes)], 1)


def _check_regions(result: ExtractResult, values: list[int], regions: list[Any]) -> None:
    assert result.is_ragged("k")
    per_image = result["k"]
    assert isinstance(per_image, list) and len(per_image) == len(values)
    for value, boxes, got in zip(values, regions, per_image, strict=True):
        np.testing.assert_array_equal(got, _expected(value, boxes))


def test_regions_stay_with_their_image_across_chunks(
    client: FeatureClient, recorder: RecordingServicer
) -> None:
    values = [10, 20, 30, 40, 50]
    result = client.extract([img(v) for v in values], model="fake", nodes={"layer4": "k"},
                            pool="gem", regions=REGIONS)  # fmt: skip
    # max_images_per_request = 2: three calls, each image's boxes inside its own Image
    assert [len(r.images) for r in recorder.requests] == [2, 2, 1]
    sent = [im for r in recorder.requests for im in r.images]
    assert [len(im.regions) for im in sent] == [1, 3, 0, 2, 0]
    assert [image_value(im) for im in sent] == values
    _check_regions(result, values, REGIONS)
    assert result.per_image[1]["k"].shape == (3, 5)
    with pytest.raises(ValueError, match="different shapes per image"):
        result.array("k")


def test_regions_stay_with_their_image_when_split_by_bytes(
    fake: tuple[RecordingServicer, str], recorder: RecordingServicer
) -> None:
    """Calls split by message size (not only by image count) keep the regions too."""
    values = [10, 20, 30, 40, 50]
    images = [np.full((96, 96, 3), v, np.uint8) for v in values]  # 27 KiB each
    with FeatureClient(fake[1], max_message_bytes=40_000) as small:
        result = small.extract(images, model="fake", nodes={"layer4": "k"}, pool="gem",
                               regions=REGIONS)  # fmt: skip
    assert [len(r.images) for r in recorder.requests] == [1] * 5  # one image per message
    assert all(r.ByteSize() < 40_000 for r in recorder.requests)
    _check_regions(result, values, REGIONS)


def test_equal_region_counts_stack(client: FeatureClient) -> None:
    regions = [[(0, 0, 2, 2), (1, 1, 3, 3)], np.array([[2, 2, 4, 4], [3, 3, 5, 5]])]
    result = client.extract([img(1), img(2)], model="fake", nodes={"n": "k"}, pool="gem",
                            regions=regions)  # fmt: skip
    assert not result.is_ragged("k")
    stacked = result["k"]
    assert isinstance(stacked, np.ndarray) and stacked.shape == (2, 2, 5)
    np.testing.assert_array_equal(stacked[1, :, 1:], regions[1])
    assert len(result.arrays("k")) == 2


def test_int8_outputs_decode_to_int8(client: FeatureClient) -> None:
    regions = [[(0, 0, 120, 127)], None]
    result = client.extract([img(100), img(7)], model="fake", nodes={"n": "k"}, pool="gem",
                            normalize=True, dtype="int8", regions=regions)  # fmt: skip
    first, second = result.arrays("k")
    assert first.dtype == np.int8 and second.dtype == np.int8
    np.testing.assert_array_equal(first, [[100, 0, 0, 120, 127]])
    np.testing.assert_array_equal(second, [7, 0, 0, 0, 0])
    assert first.flags.writeable
    np.testing.assert_allclose(first / 127, [[100 / 127, 0, 0, 120 / 127, 1.0]])


# --------------------------------------------------------------------------- other entry points


def test_server_info_lists_heads(client: FeatureClient) -> None:
    info = client.get_server_info()
    assert info.heads == (
        HeadInfo(name="gl18", model="fake", input_dim=2048, components=512, nodes=("layer4",),
                 pool="gem"),
        HeadInfo(name="any", model="", input_dim=64, components=64),
    )  # fmt: skip
    assert "int8" in info.output_dtypes


async def test_async_client_sends_the_same(
    fake: tuple[RecordingServicer, str], recorder: RecordingServicer
) -> None:
    values = [10, 20, 30, 40, 50]
    async with AsyncFeatureClient(fake[1], timeout=10) as aclient:
        result = await aclient.extract(
            [img(v) for v in values], model="fake", nodes={"layer4": "k"}, pool="catavgmax",
            post=["pca:any:32"], tta={"scales": [1, 0.5]}, regions=REGIONS, roi_size=3,
        )  # fmt: skip
        heads = (await aclient.get_server_info()).heads
    assert [h.name for h in heads] == ["gl18", "any"]
    assert [len(r.images) for r in recorder.requests] == [2, 2, 1]
    for request in recorder.requests:
        assert request.output == pb.OutputOptions(
            pool=pb.POOLING_CATAVGMAX, gem_p=3.0, dtype="float32", roi_size=3,
            post=[OP(op=OP.OP_PCA, head="any", dim=32)],
            tta=pb.TestTimeAugmentation(scales=[1, 0.5]),
        )  # fmt: skip
    _check_regions(result, values, REGIONS)


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_extract_many_items_carry_their_regions(
    client: FeatureClient, recorder: RecordingServicer, transport: str
) -> None:
    values = [10, 20, 30, 40, 50]
    items: list[Any] = [(f"id{i}", img(v), REGIONS[i]) for i, v in enumerate(values)]
    items.append(("plain", img(60)))  # two-tuples still work
    out = dict(client.extract_many(items, model="fake", nodes={"n": "k"}, pool="rgem",
                                   rmac_levels=2, post="l2", dtype="int8",
                                   transport=transport, batch_size=2))  # fmt: skip
    assert list(out) == [f"id{i}" for i in range(5)] + ["plain"]
    for i, value in enumerate(values):
        result = out[f"id{i}"]
        assert isinstance(result, ExtractResult)
        (got,) = result.arrays("k")
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, _expected(value, REGIONS[i]))
    for request in recorder.requests:
        assert request.output == pb.OutputOptions(
            pool=pb.POOLING_RGEM, gem_p=3.0, dtype="int8", rmac_levels=2, post=[OP(op=OP.OP_L2)]
        )
    sent = {image_value(im): len(im.regions) for r in recorder.requests for im in r.images}
    assert sent == {10: 1, 20: 3, 30: 0, 40: 2, 50: 0, 60: 0}


def test_extract_many_refuses_bad_regions_per_item(client: FeatureClient) -> None:
    items = [("ok", img(1), [(0, 0, 2, 2)]), ("bad", img(2), [(2, 0, 1, 2)])]
    out = dict(client.extract_many(items, model="fake", nodes="n", pool="gem", errors="yield"))
    assert isinstance(out["ok"], ExtractResult)
    error = out["bad"]
    assert not isinstance(error, ExtractResult)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "is empty" in error.details


# --------------------------------------------------------------------------- CLI


def _photo(path: Path, value: int) -> Path:
    path.write_bytes(bytes([value]) * (10 + value))  # the fake only counts bytes
    return path


def test_cli_descriptor_flags(
    fake: tuple[RecordingServicer, str], recorder: RecordingServicer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    files = [str(_photo(tmp_path / f"{i}.jpg", i)) for i in range(2)]
    out = tmp_path / "d.npz"
    argv = ["--target", fake[1], "extract", *files, "--model", "fake", "-n", "layer3",
            "-n", "layer4", "--pool", "rgem", "--rmac-levels", "2", "--post", "power",
            "--post", "whiten:gl18:64", "--concat", "--concat-key", "d", "--tta-flip",
            "--tta-scales", "1,0.707,0.5", "--dtype", "int8", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    (request,) = recorder.requests
    assert request.output == pb.OutputOptions(
        pool=pb.POOLING_RGEM, gem_p=3.0, dtype="int8", rmac_levels=2, concat=True,
        concat_key="d", post=[OP(op=OP.OP_POWER, alpha=0.5),
                              OP(op=OP.OP_WHITEN, head="gl18", dim=64)],
        tta=pb.TestTimeAugmentation(flip=True, scales=[1, 0.707, 0.5]),
    )  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert ["d", "[2,", "5]", "int8", "d"] in [line.split() for line in printed]
    with np.load(out) as npz:
        assert list(npz.keys()) == ["d"] and npz["d"].dtype == np.int8
        np.testing.assert_array_equal(npz["d"][:, 0], [10, 11])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--post", "wihten:h"], "cannot read post step 'wihten:h'"),
        (["--post", "power:3"], r"alpha must be in \(0, 1\]"),
        (["--tta-scales", "1,x"], "not a list of numbers"),
        (["--tta-scales", "1,-1"], "must be positive"),
        (["--rmac-levels", "0"], "at least 1"),
        (["--pool", "median"], "invalid choice"),
        (["--dtype", "int8"], "pick a pool"),  # raw int8: refused by the SDK, exit 2
    ],
)
def test_cli_bad_descriptor_flags(
    fake: tuple[RecordingServicer, str], recorder: RecordingServicer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], args: list[str], match: str,
) -> None:  # fmt: skip
    image = str(_photo(tmp_path / "a.jpg", 1))
    argv = ["--target", fake[1], "extract", image, "--model", "fake", "-n", "x", *args]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refusals
        code = int(exc.code or 0)
    assert code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not recorder.requests


@pytest.mark.parametrize("fmt", [".npz", ".npy", ".parquet"])
def test_cli_bulk_int8_concat_resumes_in_every_format(
    fake: tuple[RecordingServicer, str], recorder: RecordingServicer, tmp_path: Path, fmt: str
) -> None:
    if fmt == ".parquet":
        pytest.importorskip("pyarrow")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        _photo(src / f"{i}.jpg", i)
    out = tmp_path / f"o{fmt}"
    argv = ["--target", fake[1], "extract", str(src), "--model", "fake", "-n", "layer3",
            "-n", "layer4", "--pool", "gem", "--concat", "--post", "l2", "--dtype", "int8",
            "-o", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    _photo(src / "3.jpg", 3)
    recorder.requests.clear()
    assert main(argv) == 0
    # resumed: only the new image is sent (and the 32x32 black probe image)
    assert sorted(image_value(im) for r in recorder.requests for im in r.images) == [0, 13]
    if fmt == ".npz":
        with np.load(out) as npz:
            ids, array = list(npz["ids"]), npz["descriptor"]
    elif fmt == ".npy":
        ids, array = out.with_suffix(".ids.txt").read_text().split(), np.load(out)
    else:
        from layertap.client.cli.stores import ParquetStore as _ParquetStore

        table = _ParquetStore(out).load()
        assert table is not None
        ids, array = table.ids, table.arrays["descriptor"]
    assert ids == [f"{i}.jpg" for i in range(4)]
    assert array.dtype == np.int8 and array.shape == (4, 5)
    np.testing.assert_array_equal(array[:, 0], [10, 11, 12, 13])
    # other descriptor options into the same file are refused, not mixed in
    if fmt == ".parquet":
        assert main([*argv, "--tta-flip"]) == 2


# --------------------------------------------------------------------------- without torch


def test_descriptor_options_need_no_torch() -> None:
    script = textwrap.dedent(
        """
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "PIL"):
                    raise ImportError(f"blocked for this test: {name}")
                return None

        sys.meta_path.insert(0, Blocker())
        import numpy as np

        import layertap.client.cli
        from layertap.client._requests import build_extract_request
        from layertap.client._responses import decode_tensor
        from layertap.v1 import layertap_pb2 as pb

        request, n = build_extract_request(
            [np.zeros((4, 5, 3), np.uint8), b"jpeg"], model="m", nodes=["layer3", "layer4"],
            pool="gem", gem_p=3.0, normalize=False, dtype="int8", post=["whiten:h:8", "l2"],
            concat=True, tta={"flip": True, "scales": [1, 0.5]},
            regions=[np.array([[0, 0, 2, 2]]), None],
        )
        assert n == 2 and len(request.images[0].regions) == 1
        t = pb.Tensor(dtype="int8", shape=[2], data=bytes([0x81, 0x7F]))
        assert decode_tensor(t).tolist() == [-127, 127]
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "PIL")]
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_build_extract_request_attaches_regions_in_order() -> None:
    request, n = build_extract_request(
        [img(1), img(2)], model="m", nodes="n", pool="gem", gem_p=3.0, normalize=True,
        dtype="float32", regions=[None, [(0, 0, 1, 1), (1, 1, 2, 2)]],
    )  # fmt: skip
    assert n == 2 and [len(im.regions) for im in request.images] == [0, 2]
    assert request.images[1].regions[1] == pb.Box(x1=1, y1=1, x2=2, y2=2)
