"""The bad-input corpus: every row is one request, its documented status, and a normal request
right after it that must still succeed.

Rows come from `corpus_cases()`, which the figures script (bench/reliability_figures.py) imports
to reproduce the table: put `tests/` and `tests/reliability/` on sys.path, start a server with
`corpus_settings()` and call `run_corpus(target, scratch_dir)`. Nothing here writes files
outside the scratch directory; `pytest -s` prints the table.

Valid-but-odd images (1×1, 16-bit, CMYK, gray+alpha, animated GIF, WebP, JPEG bytes in a file
named .png) must come back OK with the right shapes, and where an exact 8-bit twin exists, with
exactly the twin's outputs. INTERNAL and UNKNOWN are always failures.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, start_server
from PIL import Image

from layertap.client._images import image_to_proto
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND

MODEL = "tiny"
WIDTH = 6
SIZE = 64  # the tiny model's input size: stem.0 is [6, 64, 64], pools [6, 8, 8]
NODES = ("stem.0", "pools")
SHAPES = ((WIDTH, SIZE, SIZE), (WIDTH, SIZE // 8, SIZE // 8))
MAX_IMAGES = 8
MAX_MESSAGE = 2 * 1024 * 1024
MAX_IMAGE_BYTES = 1024 * 1024
# The client channel may send more than the server accepts, so the server's own limit answers.
CLIENT_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def corpus_settings(**overrides: object) -> Settings:
    """A server for the corpus: the tiny factory model and small, round limits."""
    values: dict[str, object] = {
        "port": 0,
        "max_images_per_request": MAX_IMAGES,
        "max_message_bytes": MAX_MESSAGE,
        "max_image_bytes": MAX_IMAGE_BYTES,
        "max_wait_ms": 2,
        "log_level": "ERROR",
        "models": (
            ModelConfig(
                name=MODEL,
                factory="factories:tiny_net",
                kwargs={"width": WIDTH},
                weights="none",
                allow_random=True,
                input_size=(SIZE, SIZE),
            ),
        ),
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- inputs


def pixels(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    """A smooth RGB test image (JPEG-friendly), uint8 HWC."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    return np.clip(base + rng.integers(0, 16, (h, w, 3)), 0, 255).astype(np.uint8)


def save(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16_rgb(array8: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one) whose samples are v * 257: exact 8-bit twin."""
    h, w, _ = array8.shape
    wide = (array8.astype(">u2") * 257).reshape(h, w * 3)
    rows = b"".join(b"\x00" + row.tobytes() for row in wide)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def png16_gray(gray8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray8.astype(np.uint16) * 257).save(buf, "PNG")  # mode I;16
    data = buf.getvalue()
    assert data[24] == 16, "Pillow did not write a 16-bit PNG"
    return data


def png_declaring(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR claims width x height (a decompression bomb)."""
    raw = encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return raw[:8] + ihdr + raw[8 + 25 :]


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(pixels(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(pixels(8, 8), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(pixels(8, 8), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def jpeg_bad_huffman() -> bytes:
    """A JPEG whose first DHT segment counts 16 x 255 codes (libjpeg: 'Bogus Huffman table')."""
    data = bytearray(encode(pixels(), "JPEG"))
    dht = data.index(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16  # marker(2) length(2) class/id(1) then 16 counts
    return bytes(data)


def animated_gif(frames: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(buf, "GIF", save_all=True, append_images=ims[1:], duration=50, loop=0)
    return buf.getvalue()


def animated_webp(frames: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(buf, "WEBP", save_all=True, append_images=ims[1:], duration=50, lossless=True)
    return buf.getvalue()


def gif_frame(frame: np.ndarray) -> np.ndarray:
    """The frame as a GIF stores it (palette quantised), so twins compare exactly."""
    return np.asarray(Image.open(io.BytesIO(encode(frame, "GIF"))).convert("RGB"))


def raw(dtype: str, shape: list[int], data: bytes) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data))


def float_image(value: float | None = None, h: int = SIZE, w: int = SIZE) -> pb.Image:
    arr = np.random.default_rng(1).standard_normal((3, h, w)).astype("<f4")
    if value is not None:
        arr[1, h // 2, w // 3] = value
    return raw("float32", [3, h, w], arr.tobytes())


# --------------------------------------------------------------------------- the corpus

Build = Callable[[Path], pb.ExtractRequest]


def request(
    *images: pb.Image | bytes,
    nodes: tuple[str, ...] | list[str] = NODES,
    model: str = MODEL,
    aliases: dict[str, str] | None = None,
    **output: object,
) -> pb.ExtractRequest:
    return pb.ExtractRequest(
        model=model,
        images=[pb.Image(encoded=i) if isinstance(i, bytes) else i for i in images],
        nodes=list(nodes),
        aliases=aliases or {},
        output=pb.OutputOptions(**output),  # type: ignore[arg-type]
    )


def fixed(req: pb.ExtractRequest) -> Build:
    return lambda _tmp: req


@dataclass(frozen=True)
class Case:
    """One corpus row: how to build the request, what status it must get, what OK must hold."""

    name: str
    expected: grpc.StatusCode
    build: Build
    # for OK: the output shapes per image, in key order (None: the default nodes' SHAPES)
    shapes: tuple[tuple[int, ...], ...] | None = None
    # for OK: a request whose outputs must be byte-identical (an exact 8-bit twin)
    twin: Build | None = None
    # for errors: a fragment the details must contain
    fragment: str = ""
    keys: tuple[str, ...] | None = None


@dataclass
class Row:
    case: str
    expected: str
    status: str
    details: str
    after_ok: bool
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def _png_named_jpeg(tmp: Path) -> pb.ExtractRequest:
    """The client reads the file by path; only the bytes travel, so content decides."""
    path = tmp / "photo.png"
    path.write_bytes(encode(pixels(), "JPEG"))
    return request(image_to_proto(path))


def _label(name: str) -> str:
    return repr(name) if len(name) <= 40 else f"{name[:8]!r}... ({len(name)} chars)"


def corpus_cases() -> list[Case]:
    """Every row of the bad-input table, in a fixed order."""
    img = pixels()
    jpeg = encode(img, "JPEG")
    png = encode(img, "PNG")
    gray = img[:, :, 0].copy()
    frames = [pixels(seed=s) for s in range(3)]
    gif_first = gif_frame(frames[0])
    huge = 2**40
    big_valid = raw("float32", [3, SIZE, SIZE], np.zeros((3, SIZE, SIZE), "<f4").tobytes())
    c = Case
    return [
        # --- encoded bytes that are not a usable image
        c("empty bytes", INVALID, fixed(request(b"")), fragment="image 0"),
        c(
            "image with neither bytes nor tensor",
            INVALID,
            fixed(request(pb.Image())),
            fragment="neither",
        ),
        c("random bytes", INVALID, fixed(request(np.random.default_rng(7).bytes(3000)))),
        c("text that looks like a path", INVALID, fixed(request(b"/etc/passwd"))),
        c("truncated JPEG", INVALID, fixed(request(jpeg[: len(jpeg) // 2])), fragment="image 0"),
        c("truncated PNG", INVALID, fixed(request(png[: len(png) // 2])), fragment="image 0"),
        c("JPEG with a corrupt Huffman table", INVALID, fixed(request(jpeg_bad_huffman()))),
        c(
            "TIFF (unsupported format)",
            INVALID,
            fixed(request(encode(img, "TIFF"))),
            fragment="TIFF",
        ),
        c(
            "PNG declaring 50,000x50,000",
            EXHAUSTED,
            fixed(request(png_declaring(50_000, 50_000))),
            fragment="50000",
        ),
        c(
            "JPEG declaring 50,000x50,000",
            EXHAUSTED,
            fixed(request(jpeg_declaring(50_000, 50_000))),
            fragment="50000",
        ),
        c("GIF declaring 50,000x50,000", EXHAUSTED, fixed(request(gif_declaring(50_000, 50_000)))),
        c("BMP declaring 50,000x50,000", EXHAUSTED, fixed(request(bmp_declaring(50_000, 50_000)))),
        c("PNG declaring 0x0", INVALID, fixed(request(png_declaring(0, 0)))),
        c(
            "encoded image over max_image_bytes",
            EXHAUSTED,
            fixed(request(b"\xff\xd8\xff" + bytes(MAX_IMAGE_BYTES))),
            fragment=str(MAX_IMAGE_BYTES),
        ),
        # --- valid but odd images: OK, right shapes, exact twins where they exist
        c("1x1 JPEG", OK, fixed(request(encode(pixels(1, 1), "JPEG")))),
        c("1x1 PNG", OK, fixed(request(encode(pixels(1, 1), "PNG")))),
        c("16-bit RGB PNG", OK, fixed(request(png16_rgb(img))), twin=fixed(request(png))),
        c(
            "16-bit gray PNG",
            OK,
            fixed(request(png16_gray(gray))),
            twin=fixed(request(encode(gray, "PNG"))),
        ),
        c("CMYK JPEG", OK, fixed(request(save(Image.fromarray(img).convert("CMYK"), "JPEG")))),
        c(
            "gray + alpha PNG (LA)",
            OK,
            fixed(request(encode(np.stack([gray, 255 - gray], -1), "PNG"))),
            twin=fixed(request(encode(gray, "PNG"))),
        ),
        c(
            "RGBA PNG",
            OK,
            fixed(request(encode(np.dstack([img, gray]), "PNG"))),
            twin=fixed(request(png)),
        ),
        c("palette PNG", OK, fixed(request(save(Image.fromarray(img).quantize(16), "PNG")))),
        c(
            "animated GIF (first frame)",
            OK,
            fixed(request(animated_gif(frames))),
            twin=fixed(request(encode(gif_first, "PNG"))),
        ),
        c(
            "WebP (lossless)",
            OK,
            fixed(request(encode(img, "WEBP", lossless=True))),
            twin=fixed(request(png)),
        ),
        c("WebP (lossy)", OK, fixed(request(encode(img, "WEBP", quality=80)))),
        c(
            "animated WebP (first frame)",
            OK,
            fixed(request(animated_webp(frames))),
            twin=fixed(request(encode(frames[0], "PNG"))),
        ),
        c("BMP", OK, fixed(request(encode(img, "BMP"))), twin=fixed(request(png))),
        c("JPEG bytes in a file named .png", OK, _png_named_jpeg, twin=fixed(request(jpeg))),
        # --- raw tensors
        c(
            "raw uint8 [H,W,3]",
            OK,
            fixed(request(raw("uint8", [40, 50, 3], pixels(40, 50).tobytes()))),
        ),
        c("raw float32 [3,H,W] at input size", OK, fixed(request(big_valid))),
        c(
            "raw uint8 with one byte missing",
            INVALID,
            fixed(request(raw("uint8", [4, 4, 3], bytes(47)))),
            fragment="needs 48 bytes",
        ),
        c(
            "raw float32 with extra bytes",
            INVALID,
            fixed(request(raw("float32", [3, 8, 8], bytes(3 * 64 * 4 + 4)))),
        ),
        c(
            "raw dtype int64",
            INVALID,
            fixed(request(raw("int64", [4, 4, 3], bytes(384)))),
            fragment="int64",
        ),
        c("raw dtype float64", INVALID, fixed(request(raw("float64", [3, 8, 8], bytes(1536))))),
        c("raw dtype empty", INVALID, fixed(request(raw("", [4, 4, 3], bytes(48))))),
        c(
            "raw dtype float16 (not an input dtype)",
            INVALID,
            fixed(request(raw("float16", [3, 8, 8], bytes(384)))),
        ),
        c(
            "raw uint8 CHW instead of HWC",
            INVALID,
            fixed(request(raw("uint8", [3, 16, 16], bytes(768)))),
        ),
        c(
            "raw negative shape",
            INVALID,
            fixed(request(raw("uint8", [-4, 4, 3], bytes(48)))),
            fragment="negative",
        ),
        c("raw zero-size shape", INVALID, fixed(request(raw("uint8", [0, 4, 3], b"")))),
        c(
            "raw huge shape 2^40 x 2^40",
            EXHAUSTED,
            fixed(request(raw("uint8", [huge, huge, 3], bytes(48)))),
            fragment="pixels",
        ),
        c(
            "raw huge float32 shape",
            EXHAUSTED,
            fixed(request(raw("float32", [1, 3, 2**31, 2**31], bytes(48)))),
        ),
        c(
            "raw int64-max shape",
            EXHAUSTED,
            fixed(request(raw("uint8", [2**63 - 1, 1, 3], bytes(48)))),
        ),
        c(
            "raw rank-5 tensor",
            INVALID,
            fixed(request(raw("float32", [1, 1, 3, 4, 4], bytes(192)))),
        ),
        c("raw float32 with NaN", INVALID, fixed(request(float_image(math.nan))), fragment="NaN"),
        c("raw float32 with +Inf", INVALID, fixed(request(float_image(math.inf)))),
        c("raw float32 with -Inf", INVALID, fixed(request(float_image(-math.inf)))),
        c(
            "raw float32 smaller than the model takes",
            INVALID,
            fixed(request(float_image(h=4, w=4))),
            fragment="4x4",
        ),
        # --- request-level limits and fields
        c("zero images", INVALID, fixed(request()), fragment="no images"),
        c(
            f"{MAX_IMAGES + 1} images (limit {MAX_IMAGES})",
            EXHAUSTED,
            fixed(request(*[jpeg] * (MAX_IMAGES + 1))),
            fragment=f"max_images_per_request={MAX_IMAGES}",
        ),
        c(
            "message over max_message_bytes (2 MiB)",
            EXHAUSTED,
            fixed(request(jpeg + bytes(3 * 1024 * 1024))),
        ),
        c(
            "response over max_message_bytes",
            EXHAUSTED,
            fixed(request(*[float_image(h=256, w=256)] * 2, nodes=["stem.0"])),
            fragment="max_message_bytes",
        ),
        c("empty node list", INVALID, fixed(request(jpeg, nodes=[])), fragment="no nodes"),
        c("empty node name", INVALID, fixed(request(jpeg, nodes=[""]))),
        c(
            "1,000 unknown node names",
            INVALID,
            fixed(request(jpeg, nodes=[f"layer{i}" for i in range(1000)])),
        ),
        c(
            "1,000 copies of one node name",
            OK,
            fixed(request(jpeg, nodes=["pools"] * 1000)),
            shapes=(SHAPES[1],),
        ),
        *(
            c(f"node name {_label(name)}", INVALID, fixed(request(jpeg, nodes=[name])))
            for name in (
                "stem.*",
                "pools|stem.0",
                "stem[0]",
                "(",
                "^pools$",
                r"\d",
                "pools.",
                "pöols",
                "ｐｏｏｌｓ",
                "pools\u202e",
                "stem\x00.0",
                "🧠",
                "../pools",
                "stem/0",
                "/etc/passwd",
                "..\\pools",
                "x" * 10_000,
                "__import__('os').system('true')",
                "os:system",
                "torch.load",
                "x",  # the model's input placeholder, not an activation
            )
        ),
        c(
            "unknown model",
            NOT_FOUND,
            fixed(request(jpeg, model="resnet1000")),
            fragment="resnet1000",
        ),
        c("model name that is a path", NOT_FOUND, fixed(request(jpeg, model="../../etc/passwd"))),
        c(
            "model name that is an import",
            NOT_FOUND,
            fixed(request(jpeg, model="torchvision.models:resnet18")),
        ),
        c("empty model name", INVALID, fixed(request(jpeg, model="")), fragment="model"),
        c("unknown pool 99", INVALID, fixed(request(jpeg, pool=99)), fragment="99"),
        c("unknown pool -1", INVALID, fixed(request(jpeg, pool=-1))),
        c("CLS pool on an NCHW node", INVALID, fixed(request(jpeg, pool=pb.POOLING_CLS))),
        c(
            "GeM p = 0 (documented: default 3)",
            OK,
            fixed(request(jpeg, pool=pb.POOLING_GEM)),
            shapes=((WIDTH,), (WIDTH,)),
            twin=fixed(request(jpeg, pool=pb.POOLING_GEM, gem_p=3)),
        ),
        *(
            c(
                f"GeM p = {p}",
                INVALID,
                fixed(request(jpeg, pool=pb.POOLING_GEM, gem_p=p)),
                fragment="gem_p",
            )
            for p in (-1.0, -0.0001, 0.05, 1e30, math.nan, math.inf, -math.inf)
        ),
        c(
            "output dtype float64",
            INVALID,
            fixed(request(jpeg, dtype="float64")),
            fragment="float64",
        ),
        c("output dtype 'FLOAT32'", INVALID, fixed(request(jpeg, dtype="FLOAT32"))),
        c("output dtype uint8", INVALID, fixed(request(jpeg, dtype="uint8"))),
        c("output dtype bfloat16", OK, fixed(request(jpeg, dtype="bfloat16"))),
        c(
            "alias map with duplicate output keys",
            INVALID,
            fixed(request(jpeg, aliases={"stem.0": "x", "pools": "x"})),
            fragment="'x'",
        ),
        c(
            "alias equal to another requested node",
            INVALID,
            fixed(request(jpeg, aliases={"pools": "stem.0"})),
        ),
        c("empty alias", INVALID, fixed(request(jpeg, aliases={"pools": ""}))),
        c("alias for an unknown node", INVALID, fixed(request(jpeg, aliases={"../etc": "a"}))),
        c(
            "aliases rename, extra aliased node comes last",
            OK,
            fixed(request(jpeg, nodes=["pools"], aliases={"pools": "p", "stem": "s"})),
            shapes=(SHAPES[1], SHAPES[0]),
            keys=("p", "s"),
        ),
    ]


# --------------------------------------------------------------------------- running it


def normal_request() -> pb.ExtractRequest:
    return request(encode(pixels(seed=3), "JPEG"), nodes=["pools"], pool=pb.POOLING_AVG)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}[dtype]


def _check_ok(
    case: Case, req: pb.ExtractRequest, resp: pb.ExtractResponse, twin: pb.ExtractResponse | None
) -> list[str]:
    problems = []
    expected_shapes = case.shapes
    if expected_shapes is None:
        expected_shapes = SHAPES
    if len(resp.results) != len(req.images):
        problems.append(f"{len(resp.results)} results for {len(req.images)} images")
    for result in resp.results:
        shapes = tuple(tuple(o.tensor.shape) for o in result.outputs)
        if shapes != expected_shapes:
            problems.append(f"shapes {shapes} != {expected_shapes}")
        if case.keys is not None and tuple(o.key for o in result.outputs) != case.keys:
            problems.append(f"keys {[o.key for o in result.outputs]} != {case.keys}")
        for o in result.outputs:
            t = o.tensor
            if len(t.data) != math.prod(t.shape) * _itemsize(t.dtype):
                problems.append(f"{o.key}: {len(t.data)} bytes for {t.dtype} {list(t.shape)}")
    if twin is not None:
        mine = [[o.tensor.data for o in r.outputs] for r in resp.results]
        theirs = [[o.tensor.data for o in r.outputs] for r in twin.results]
        if mine != theirs:
            problems.append("outputs differ from the exact 8-bit twin")
    return problems


def _extract(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        "/layertap.v1.FeatureService/Extract",
        request_serializer=pb.ExtractRequest.SerializeToString,
        response_deserializer=pb.ExtractResponse.FromString,
    )


def normal_answer(channel: grpc.Channel) -> np.ndarray:
    """The normal request's descriptor [WIDTH], from a server that has seen no bad input yet:
    what every normal request after a case must still return."""
    return _normal_values(_extract(channel)(normal_request(), timeout=60))


def _normal_values(resp: pb.ExtractResponse) -> np.ndarray:
    (result,) = resp.results
    (output,) = result.outputs
    t = output.tensor
    assert t.dtype == "float32", t.dtype
    return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))


def _check_normal(resp: pb.ExtractResponse, reference: np.ndarray | None) -> list[str]:
    """What is wrong with the normal request's answer after a case (nothing: [])."""
    shapes = [[tuple(o.tensor.shape) for o in r.outputs] for r in resp.results]
    if shapes != [[(WIDTH,)]]:
        return [f"normal request afterwards: shapes {shapes} != [[({WIDTH},)]]"]
    if resp.results[0].outputs[0].tensor.dtype != "float32":
        return [f"normal request afterwards: dtype {resp.results[0].outputs[0].tensor.dtype}"]
    values = _normal_values(resp)
    if not np.all(np.isfinite(values)):
        return [f"normal request afterwards: non-finite values {values}"]
    if reference is not None and not np.allclose(values, reference, rtol=1e-5, atol=1e-6):
        return [f"normal request afterwards: {values} != {reference} before any bad input"]
    return []


def run_case(
    channel: grpc.Channel, case: Case, tmp: Path, reference: np.ndarray | None = None
) -> Row:
    """Send the case, then a normal request; the row says what happened and what was wrong.
    ``reference``: the normal request's answer before any bad input (normal_answer); without
    it, only the shape of the answer after the case is checked."""
    extract = _extract(channel)
    req = case.build(tmp)
    problems: list[str] = []
    resp: pb.ExtractResponse | None = None
    try:
        resp = extract(req, timeout=60)
        code, details = OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    if code != case.expected:
        problems.append(f"status {code.name}, expected {case.expected.name}: {details[:200]}")
    elif code == OK:
        assert resp is not None
        twin = extract(case.twin(tmp), timeout=60) if case.twin else None
        problems += _check_ok(case, req, resp, twin)
    elif case.fragment and case.fragment not in details:
        problems.append(f"details lack {case.fragment!r}: {details[:200]}")
    try:
        after = extract(normal_request(), timeout=60)
        wrong = _check_normal(after, reference)
        after_ok = not wrong
        problems += wrong
    except grpc.RpcError as err:
        after_ok = False
        problems.append(f"normal request afterwards failed: {err.code().name} {err.details()}")
    return Row(case.name, case.expected.name, code.name, details[:80], after_ok, problems)


def run_corpus(target: str, tmp: Path) -> list[Row]:
    with grpc.insecure_channel(target, options=CLIENT_OPTIONS) as channel:
        reference = normal_answer(channel)
        return [run_case(channel, case, tmp, reference) for case in corpus_cases()]


def markdown(rows: list[Row]) -> str:
    lines = [
        "| case | expected | status | details (first 80 chars) | normal request after |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        details = r.details.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r.case.replace('|', chr(92) + '|')} | {r.expected} | {r.status} | {details} | "
            f"{'OK' if r.after_ok else 'FAILED'} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the tests

ROWS: list[Row] = []


@pytest.fixture(scope="module")
def corpus_server() -> Iterator[RunningServer]:
    running = start_server(corpus_settings())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def corpus_channel(corpus_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(corpus_server.target, options=CLIENT_OPTIONS) as channel:
        yield channel


@pytest.fixture(scope="module")
def corpus_reference(corpus_channel: grpc.Channel) -> np.ndarray:
    """The normal request's answer, asked before the first case runs."""
    return normal_answer(corpus_channel)


@pytest.fixture(scope="module", autouse=True)
def _print_table() -> Iterator[None]:
    yield
    if ROWS:
        print(f"\n\nbad-input corpus ({len(ROWS)} rows):\n" + markdown(ROWS))


def test_corpus_names_are_unique() -> None:
    names = [c.name for c in corpus_cases()]
    assert len(names) == len(set(names))
    assert len(names) >= 60


@pytest.mark.parametrize("case", corpus_cases(), ids=lambda c: c.name)
def test_bad_input(
    corpus_channel: grpc.Channel, corpus_reference: np.ndarray, case: Case, tmp_path: Path
) -> None:
    row = run_case(corpus_channel, case, tmp_path, corpus_reference)
    ROWS.append(row)
    assert row.status not in ("UNKNOWN", "INTERNAL"), row
    assert row.passed, row.problems


def _memory_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field_name} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_bomb_headers_keep_memory_flat(corpus_channel: grpc.Channel) -> None:
    """Bombs are refused from the header: the in-process server's RSS does not grow (< 50 MB),
    and where the kernel lets us reset the peak, the peak during the requests stays flat too.
    A decoded 50,000 x 50,000 RGB image would be 7.5 GB."""
    extract = corpus_channel.unary_unary(
        "/layertap.v1.FeatureService/Extract",
        request_serializer=pb.ExtractRequest.SerializeToString,
        response_deserializer=pb.ExtractResponse.FromString,
    )
    bombs = [
        png_declaring(50_000, 50_000),
        jpeg_declaring(50_000, 50_000),
        gif_declaring(50_000, 50_000),
        bmp_declaring(50_000, 50_000),
    ]
    extract(normal_request(), timeout=60)  # warm every code path first
    before = _memory_kb("VmRSS")
    peak_tracked = _reset_peak()
    for i in range(24):
        with pytest.raises(grpc.RpcError) as info:
            extract(request(bombs[i % len(bombs)], bombs[(i + 1) % len(bombs)]), timeout=60)
        assert info.value.code() == EXHAUSTED, info.value.details()
    after = _memory_kb("VmRSS")
    peak = _memory_kb("VmHWM")
    print(
        f"\nRSS before {before / 1024:.1f} MB, after {after / 1024:.1f} MB, "
        f"peak during {peak / 1024:.1f} MB (peak reset: {peak_tracked})"
    )
    assert after - before < 50 * 1024, (before, after)
    if peak_tracked:
        assert peak - before < 50 * 1024, (before, peak)
    assert len(extract(normal_request(), timeout=60).results) == 1


def test_unknown_node_suggestions_are_distinct(corpus_channel: grpc.Channel) -> None:
    """'closest valid names' lists each name once (a node name that is also a dotted prefix,
    like stem.0, must not be suggested twice)."""
    extract = corpus_channel.unary_unary(
        "/layertap.v1.FeatureService/Extract",
        request_serializer=pb.ExtractRequest.SerializeToString,
        response_deserializer=pb.ExtractResponse.FromString,
    )
    for name in ("stem.*", "stem[0]", "pools.", "os:system"):
        with pytest.raises(grpc.RpcError) as info:
            extract(request(encode(pixels(), "JPEG"), nodes=[name]), timeout=60)
        details = info.value.details()
        assert "closest valid names: " in details, details
        names = details.split("closest valid names: ")[1].split(". Hint")[0].split(", ")
        assert len(names) == len(set(names)), details
