"""Property-based fuzzing of the live server: hypothesis builds ExtractRequest messages (valid,
odd and broken models, nodes, aliases, images and output options) and sends them to one
in-process server.

Every answer must be OK or a documented status (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED), never UNKNOWN or INTERNAL; an OK answer must be self-consistent (one
result per image, keys in request order, len(data) == prod(shape) * itemsize, pooled outputs
1-D, normalised outputs of unit norm); and the server must answer a normal request afterwards.
The run is derandomised (same examples every CI run) and bounded: 2,000 cases on a tiny model
(resnet18 in about 1 in 20), at most 4 images of at most 64x64 each.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from conftest import RunningServer, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EXTRACT = "/layertap.v1.FeatureService/Extract"
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "int8": 1}
POOLED = {pb.POOLING_AVG, pb.POOLING_MAX, pb.POOLING_GEM, pb.POOLING_CLS, pb.POOLING_MEAN}
FUZZ = settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ODD_STRINGS = [
    "",
    " ",
    ".",
    "..",
    "../../etc/passwd",
    "/etc/passwd",
    "C:\\Windows\\win.ini",
    "os:system",
    "torchvision.models:resnet18",
    "__import__('os')",
    "eval",
    ".*",
    "(",
    "[a-z]+",
    "\\",
    "%s",
    "{0}",
    "\x00",
    "😀",
    "ｓｔｅｍ",
    "stem\u200b.0",
    "x" * 300,
]


def fuzz_settings() -> Settings:
    return Settings(
        port=0,
        max_images_per_request=3,
        max_image_pixels=1_000_000,  # bounds the cost of a mutated header that claims a big size
        max_image_bytes=256 * 1024,
        max_wait_ms=1,
        log_level="ERROR",
        models=(
            ModelConfig(
                name="tiny",
                factory="factories:tiny_net",
                kwargs={"width": 4},
                weights="none",
                allow_random=True,
                input_size=(32, 32),
            ),
            ModelConfig(name="resnet18", arch="resnet18", weights="none", allow_random=True),
        ),
    )


@dataclass
class FuzzEnv:
    server: RunningServer
    channel: grpc.Channel
    nodes: dict[str, list[str]]  # model -> full node names (DescribeModel)


@pytest.fixture(scope="module")
def env() -> Iterator[FuzzEnv]:
    quiet = logging.getLogger("layertap")  # thousands of expected client errors: not news
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    server = start_server(fuzz_settings())
    channel = server.channel()
    stub = server.stub()
    nodes = {
        m: [n.name for n in stub.DescribeModel(pb.DescribeModelRequest(model=m)).nodes]
        for m in ("tiny", "resnet18")
    }
    yield FuzzEnv(server, channel, nodes)
    channel.close()
    server.stop()
    quiet.setLevel(level)


# --------------------------------------------------------------------------- strategies

MODES = {
    "PNG": ["RGB", "L", "LA", "RGBA", "P", "I;16", "1"],
    "JPEG": ["RGB", "L", "CMYK"],
    "GIF": ["RGB", "L", "P"],
    "BMP": ["RGB", "L", "P"],
    "WEBP": ["RGB", "RGBA"],
}


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    """A small real image in some format and mode, sometimes truncated or with flipped bytes."""
    h, w = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    seed = draw(st.integers(0, 2**16))
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == "I;16":
        im = Image.fromarray(arr[:, :, 0].astype(np.uint16) * 257)
    elif mode == "P":
        im = im.quantize(16)
    elif mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    if fmt in ("GIF", "WEBP") and draw(st.booleans()):  # animated
        frames = [im, Image.fromarray(255 - arr).convert(im.mode)]
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=40)
    else:
        im.save(buf, fmt)
    data = bytearray(buf.getvalue())
    mutation = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "header"]))
    if mutation == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif mutation == "header":
        index = draw(st.integers(0, min(len(data), 64) - 1))
        data[index] = draw(st.integers(0, 255))
    return bytes(data)


DIMS = st.one_of(
    st.integers(-3, 48),
    st.sampled_from([0, 1, 3, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]),
)


@st.composite
def raw_tensors(draw: st.DrawFn) -> pb.Tensor:
    """Raw image tensors: good and bad dtypes, shapes (negative, huge) and byte counts."""
    dtype = draw(
        st.one_of(
            st.sampled_from(["uint8", "uint8", "float32", "float32", "float16", "bfloat16"]),
            st.sampled_from(["int64", "float64", "", "UINT8", "float"]),
            st.text(max_size=6),
        )
    )
    kind = draw(st.sampled_from(["hwc", "chw", "nchw", "huge", "any"]))
    if kind == "hwc":
        shape = [draw(st.integers(1, 48)), draw(st.integers(1, 48)), 3]
    elif kind == "chw":
        shape = [3, draw(st.integers(1, 48)), draw(st.integers(1, 48))]
    elif kind == "nchw":
        shape = [1, 3, draw(st.integers(1, 48)), draw(st.integers(1, 48))]
    elif kind == "huge":  # the right rank, far too many pixels
        big = st.sampled_from([1025, 2**20, 2**31, 2**62])
        shape = [draw(big), draw(big), 3] if dtype == "uint8" else [3, draw(big), draw(big)]
    else:
        shape = draw(st.lists(DIMS, max_size=5))
    itemsize = ITEMSIZE.get(dtype, 4)
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    exact = 0 <= count * itemsize <= 48 * 48 * 3 * 4
    if exact and draw(st.integers(0, 3)) > 0:
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        if dtype == "float32":
            values = rng.standard_normal(count).astype("<f4")
            if count and draw(st.integers(0, 4)) == 0:
                values[draw(st.integers(0, count - 1))] = draw(
                    st.sampled_from([math.nan, math.inf, -math.inf, 3e38])
                )
            data = values.tobytes()
        else:
            data = rng.bytes(count * itemsize)
        cut = draw(st.sampled_from([0, 0, 0, 0, 1, -1]))  # sometimes one byte off
        data = data[:-1] if cut == 1 and data else data + b"\x00" * (cut == -1)
    else:
        data = draw(st.binary(max_size=256))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


IMAGES = st.one_of(
    encoded_images().map(lambda b: pb.Image(encoded=b)),
    encoded_images().map(lambda b: pb.Image(encoded=b)),
    st.binary(max_size=300).map(lambda b: pb.Image(encoded=b)),
    raw_tensors().map(lambda t: pb.Image(tensor=t)),
    st.just(pb.Image()),
)


def model_names() -> st.SearchStrategy[str]:
    return st.integers(0, 19).flatmap(
        lambda i: (
            st.just("tiny")
            if i < 14
            else st.just("resnet18")
            if i == 14
            else st.text(max_size=12)
            if i == 15
            else st.sampled_from([*ODD_STRINGS, "TINY", "tiny ", "resnet18\x00", "resnet"])
        )
    )


def node_names(known: list[str]) -> st.SearchStrategy[str]:
    truncated = sorted({".".join(n.split(".")[:k]) for n in known for k in (1, 2)})
    return st.one_of(
        st.sampled_from(known),
        st.sampled_from(known),
        st.sampled_from(truncated),
        st.sampled_from(known).map(lambda n: n[: max(1, len(n) - 2)]),  # cut mid-name
        st.sampled_from(ODD_STRINGS),
        st.text(max_size=10),
    )


def output_options() -> st.SearchStrategy[pb.OutputOptions]:
    return st.builds(
        pb.OutputOptions,
        pool=st.one_of(st.integers(0, 5), st.integers(0, 5), st.integers(-(2**31), 2**31 - 1)),
        gem_p=st.one_of(
            st.sampled_from([0.0, 3.0, 0.1, 100.0, 1.0, 0.09, 100.5]),
            st.floats(width=32),
        ),
        normalize=st.booleans(),
        dtype=st.one_of(
            st.sampled_from(["", "float32", "float16", "bfloat16"]),
            st.sampled_from(["float64", "FLOAT32", "int8", "uint8", "half"]),
            st.text(max_size=6),
        ),
    )


@st.composite
def sane_images(draw: st.DrawFn) -> pb.Image:
    """An image the server must accept: a clean encoded file or a well-formed raw tensor."""
    kind = draw(st.sampled_from(["encoded", "encoded", "uint8", "float32"]))
    h, w = draw(st.integers(8, 64)), draw(st.integers(8, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "uint8":
        data = rng.integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes()
        return pb.Image(tensor=pb.Tensor(dtype="uint8", shape=[h, w, 3], data=data))
    if kind == "float32":
        data = rng.standard_normal((3, h, w)).astype("<f4").tobytes()
        return pb.Image(tensor=pb.Tensor(dtype="float32", shape=[3, h, w], data=data))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "WEBP", "BMP", "GIF"]))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return pb.Image(encoded=buf.getvalue())


def sane_options() -> st.SearchStrategy[pb.OutputOptions]:
    return st.builds(
        pb.OutputOptions,
        pool=st.integers(0, 3),
        gem_p=st.one_of(st.just(0.0), st.floats(0.125, 100, width=32)),
        normalize=st.booleans(),
        dtype=st.sampled_from(["", "float32", "float16", "bfloat16"]),
    )


WILD_FIELDS = ("model", "images", "nodes", "aliases", "output")


@st.composite
def extract_requests(draw: st.DrawFn, nodes: dict[str, list[str]]) -> pb.ExtractRequest:
    """Half the time every field is wild; otherwise a sane request with 0 to 2 wild fields, so
    the fuzz reaches real forwards and the checks on OK answers, not only validation."""
    if draw(st.booleans()):
        wild = set(WILD_FIELDS)
    else:
        wild = draw(st.sets(st.sampled_from(WILD_FIELDS), max_size=2))
    if "model" in wild:
        model = draw(model_names())
    else:
        model = draw(st.sampled_from(["tiny"] * 9 + ["resnet18"]))
    known = nodes.get(model, nodes["tiny"])
    good_names = st.sampled_from(
        known + sorted({n.split(".")[0] for n in known})  # full and truncated names
    )
    names = node_names(known + nodes["tiny"][:2]) if "nodes" in wild else good_names
    if "aliases" in wild:
        keys = st.one_of(st.sampled_from(["a", "b", "feat"]), names, st.text(max_size=6))
        aliases = draw(st.dictionaries(names, keys, max_size=3))
    else:
        aliases = draw(st.dictionaries(good_names, st.sampled_from(["a", "b", "c"]), max_size=1))
    if "images" in wild:
        images = draw(st.lists(IMAGES, max_size=4))  # 4 > max_images_per_request
    else:
        images = draw(st.lists(sane_images(), min_size=1, max_size=3))
    return pb.ExtractRequest(
        model=model,
        images=images,
        nodes=draw(st.lists(names, min_size=0 if "nodes" in wild else 1, max_size=4)),
        aliases=aliases,
        output=draw(output_options() if "output" in wild else sane_options()),
    )


# --------------------------------------------------------------------------- checks


def expected_keys(req: pb.ExtractRequest) -> list[str]:
    """The documented key order, derived here independently of the server's code."""
    aliases = dict(req.aliases)
    requested = list(req.nodes) + sorted(n for n in aliases if n not in set(req.nodes))
    keys: list[str] = []
    for name in requested:
        key = aliases.get(name, name)
        if key not in keys:
            keys.append(key)
    return keys


def as_float(t: pb.Tensor) -> np.ndarray:
    if t.dtype == "bfloat16":
        return (np.frombuffer(t.data, "<u2").astype(np.uint32) << 16).view(np.float32)
    if t.dtype == "int8":  # quantised unit vector: round(127 x)
        return np.frombuffer(t.data, np.int8).astype(np.float64) / 127
    return np.frombuffer(t.data, {"float32": "<f4", "float16": "<f2"}[t.dtype]).astype(np.float64)


def check_ok(req: pb.ExtractRequest, resp: pb.ExtractResponse) -> None:
    assert len(resp.results) == len(req.images)
    keys = expected_keys(req)
    assert [n.key for n in resp.metadata.nodes] == keys
    dtype = req.output.dtype or "float32"
    for result in resp.results:
        assert [o.key for o in result.outputs] == keys
        for o in result.outputs:
            t = o.tensor
            assert t.dtype == dtype
            assert all(d > 0 for d in t.shape), t.shape
            assert len(t.data) == math.prod(t.shape) * ITEMSIZE[t.dtype]
            if req.output.pool in POOLED:
                assert len(t.shape) == 1 and t.layout == "NC", (t.shape, t.layout)
            if req.output.normalize:
                values = as_float(t)
                if np.isfinite(values).all():
                    norm = float(np.linalg.norm(values))
                    assert norm < 1e-3 or abs(norm - 1) < 2e-2, norm


def normal_request() -> pb.ExtractRequest:
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return pb.ExtractRequest(
        model="tiny",
        images=[pb.Image(tensor=pb.Tensor(dtype="uint8", shape=[32, 32, 3], data=arr.tobytes()))],
        nodes=["pools"],
        output=pb.OutputOptions(pool=pb.POOLING_AVG, normalize=True),
    )


def assert_serves(channel: grpc.Channel) -> None:
    extract = channel.unary_unary(
        EXTRACT,
        request_serializer=pb.ExtractRequest.SerializeToString,
        response_deserializer=pb.ExtractResponse.FromString,
    )
    resp = extract(normal_request(), timeout=60)
    assert [tuple(o.tensor.shape) for o in resp.results[0].outputs] == [(4,)]


def summary(title: str, counts: Counter[str], started: float) -> str:
    total = sum(counts.values())
    parts = ", ".join(f"{k} {v}" for k, v in counts.most_common())
    return f"\n{title}: {total} calls in {time.perf_counter() - started:.1f} s: {parts}"


# --------------------------------------------------------------------------- the tests


def test_fuzz_extract(env: FuzzEnv) -> None:
    extract = env.channel.unary_unary(
        EXTRACT,
        request_serializer=pb.ExtractRequest.SerializeToString,
        response_deserializer=pb.ExtractResponse.FromString,
    )
    counts: Counter[str] = Counter()
    started = time.perf_counter()

    @FUZZ
    @given(req=extract_requests(env.nodes))
    def one(req: pb.ExtractRequest) -> None:
        try:
            resp = extract(req, timeout=60)
        except grpc.RpcError as err:
            counts[err.code().name] += 1
            assert err.code() in ALLOWED, (err.code(), err.details())
            return
        counts["OK"] += 1
        check_ok(req, resp)

    try:
        one()
    finally:
        print(summary("fuzzed Extract", counts, started))
    assert counts["OK"] >= 100, counts  # the fuzz reaches real forwards, not only validation
    assert_serves(env.channel)


def test_fuzz_describe_model(env: FuzzEnv) -> None:
    describe = env.server.stub().DescribeModel
    counts: Counter[str] = Counter()

    @settings(FUZZ, max_examples=300)
    @given(model=st.one_of(model_names(), st.sampled_from(ODD_STRINGS)))
    def one(model: str) -> None:
        try:
            resp = describe(pb.DescribeModelRequest(model=model), timeout=30)
        except grpc.RpcError as err:
            counts[err.code().name] += 1
            assert err.code() in ALLOWED, (err.code(), err.details())
            return
        counts["OK"] += 1
        assert model in ("tiny", "resnet18") and resp.model.name == model

    one()
    assert set(counts) <= {"OK", "NOT_FOUND", "INVALID_ARGUMENT"}, counts
    assert_serves(env.channel)


@st.composite
def wire_bytes(draw: st.DrawFn, nodes: dict[str, list[str]]) -> bytes:
    """Bytes on the wire that may not parse as an ExtractRequest at all: random bytes, or a
    real request's serialisation with bytes flipped, cut or inserted (bad UTF-8 in a string
    field, a varint running off the end, a wrong wire type)."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=200))
    data = bytearray(draw(extract_requests(nodes)).SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif op == "cut" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        else:
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x80", b"\x0a\xff"]))
    return bytes(data)


def test_fuzz_wire_bytes(env: FuzzEnv) -> None:
    """Request bytes that are not a valid ExtractRequest are a bad request: INVALID_ARGUMENT,
    as for any other malformed field, never UNKNOWN (what grpc-python answers by default when
    the request deserializer raises)."""
    raw_extract = env.channel.unary_unary(EXTRACT)  # bytes in, bytes out
    counts: Counter[str] = Counter()
    started = time.perf_counter()

    @settings(FUZZ, max_examples=300)
    @given(data=wire_bytes(env.nodes))
    def one(data: bytes) -> None:
        try:
            raw_extract(data, timeout=60)
        except grpc.RpcError as err:
            counts[err.code().name] += 1
            assert err.code() in ALLOWED, (err.code(), err.details())
            return
        counts["OK"] += 1

    try:
        one()
    finally:
        print(summary("fuzzed wire bytes", counts, started))
    assert_serves(env.channel)


UNDECODABLE = {
    "invalid field number 0": b"\x00",
    "bad UTF-8 in a string field": b"\x0a\x02\xc3\x28",
    "varint running off the end": b"\x08\xff\xff",
    "length beyond the message": b"\x0a\x10abc",
}


UNDECODABLE_CASES = [
    pytest.param(method, data, id=f"{method}-{what}")
    for method in ("ListModels", "DescribeModel", "Extract")
    for what, data in UNDECODABLE.items()
    # ListModelsRequest has no fields: there, field 1 is an unknown field and is skipped
    if not (method == "ListModels" and what == "bad UTF-8 in a string field")
]


@pytest.mark.parametrize(("method", "data"), UNDECODABLE_CASES)
def test_undecodable_request_is_invalid_argument(env: FuzzEnv, method: str, data: bytes) -> None:
    """The shortest repro of what test_fuzz_wire_bytes finds: bytes that do not parse as the
    RPC's request message must be INVALID_ARGUMENT (a malformed request), not UNKNOWN."""
    call = env.channel.unary_unary(f"/layertap.v1.FeatureService/{method}")
    with pytest.raises(grpc.RpcError) as info:
        call(data, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (
        info.value.code(),
        info.value.details(),
    )
    assert_serves(env.channel)
