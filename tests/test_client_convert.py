"""Client-side conversions: user images -> protocol messages, protocol tensors -> numpy.

No server and no torch needed (torch-specific cases skip when it is missing).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from layertap.client import ExtractResult, FeatureServiceError, bfloat16_to_float32
from layertap.client._images import as_image_list, image_to_proto, images_to_proto
from layertap.client._requests import build_extract_request
from layertap.client._responses import decode_tensor, parse_extract_response
from layertap.common.option_parsing import normalize_nodes, parse_pool
from layertap.v1 import layertap_pb2 as pb

PIL_Image = pytest.importorskip("PIL.Image")


def _raw(image: pb.Image) -> np.ndarray:
    """The raw tensor of a converted image, decoded back for comparison."""
    assert image.WhichOneof("source") == "tensor"
    return decode_tensor(image.tensor)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL_Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- encoded inputs


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_like_are_sent_encoded(wrap: type) -> None:
    data = _png_bytes(RGB)
    image = image_to_proto(wrap(data))
    assert image.WhichOneof("source") == "encoded"
    assert image.encoded == data


@pytest.mark.parametrize("as_str", [True, False])
def test_paths_are_read_and_sent_encoded(tmp_path: Path, as_str: bool) -> None:
    path = tmp_path / "img.png"
    path.write_bytes(_png_bytes(RGB))
    image = image_to_proto(str(path) if as_str else path)
    assert image.encoded == path.read_bytes()


def test_empty_and_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty image bytes"):
        image_to_proto(b"")
    with pytest.raises(ValueError, match="empty image path"):
        image_to_proto("")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        image_to_proto(tmp_path / "empty.jpg")
    with pytest.raises(FileNotFoundError):
        image_to_proto(tmp_path / "missing.jpg")


# --------------------------------------------------------------------------- numpy inputs


def test_uint8_rgb_is_sent_raw() -> None:
    tensor = image_to_proto(RGB).tensor
    assert (tensor.dtype, list(tensor.shape)) == ("uint8", [5, 7, 3])
    assert tensor.data == RGB.tobytes()


def test_non_contiguous_array_is_sent_in_c_order() -> None:
    view = np.ascontiguousarray(RGB.transpose(1, 0, 2)).transpose(1, 0, 2)  # F-ordered copy
    assert not view.flags.c_contiguous
    assert image_to_proto(view).tensor.data == RGB.tobytes()


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1)])
def test_gray_is_repeated_to_three_channels(shape: tuple[int, ...]) -> None:
    gray = RNG.integers(0, 256, size=shape, dtype=np.uint8)
    out = _raw(image_to_proto(gray))
    assert out.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray.reshape(5, 7))


def test_rgba_drops_alpha() -> None:
    rgba = np.concatenate([RGB, np.full((5, 7, 1), 9, np.uint8)], axis=2)
    np.testing.assert_array_equal(_raw(image_to_proto(rgba)), RGB)


@pytest.mark.parametrize("shape", [(3, 4, 6), (1, 3, 4, 6)])
def test_float32_model_input_is_sent_raw(shape: tuple[int, ...]) -> None:
    x = RNG.standard_normal(shape).astype(np.float32)
    tensor = image_to_proto(x).tensor
    assert (tensor.dtype, tuple(tensor.shape)) == ("float32", shape)
    np.testing.assert_array_equal(decode_tensor(tensor), x)


def test_big_endian_float32_is_sent_little_endian() -> None:
    x = RNG.standard_normal((3, 2, 2)).astype(">f4")
    tensor = image_to_proto(x).tensor
    assert tensor.data == x.astype("<f4").tobytes()


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((3, 4, 4), np.float64), r"float64.*astype\(np.float32\)"),
        (np.zeros((4, 4, 3), np.int16), "int16"),
        (np.zeros((4, 4, 3), bool), "bool"),
        (np.zeros((4, 4, 2), np.uint8), "not an image"),
        (np.zeros((4,), np.uint8), "not an image"),
        (np.zeros((2, 4, 4, 3), np.uint8), "pass a list"),
        (np.zeros((2, 3, 4, 4), np.float32), "pass a list"),
        (np.zeros((4, 4, 3), np.float32), "not a model input"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((3, 4, 0), np.float32), "empty"),
    ],
)
def test_rejected_arrays_say_what_is_accepted(array: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        image_to_proto(array)
    if "empty" not in match:
        assert "accepted arrays" in str(info.value)


# --------------------------------------------------------------------------- PIL inputs


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_pil_images_become_rgb_uint8(mode: str) -> None:
    image = PIL_Image.fromarray(RGB).convert(mode)
    out = _raw(image_to_proto(image))
    assert out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))


def test_pil_rgb_is_exact() -> None:
    np.testing.assert_array_equal(_raw(image_to_proto(PIL_Image.fromarray(RGB))), RGB)


def test_decoded_pil_image_from_file() -> None:
    image = PIL_Image.open(io.BytesIO(_png_bytes(RGB)))  # a PngImageFile subclass
    np.testing.assert_array_equal(_raw(image_to_proto(image)), RGB)


# --------------------------------------------------------------------------- torch inputs


def test_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    chw = torch.from_numpy(RGB).permute(2, 0, 1)  # uint8 [3,H,W], non-contiguous
    np.testing.assert_array_equal(_raw(image_to_proto(chw)), RGB)
    np.testing.assert_array_equal(_raw(image_to_proto(chw[None])), RGB)

    x = torch.randn(1, 3, 4, 6, requires_grad=True)
    out = _raw(image_to_proto(x))
    assert out.dtype == np.float32 and out.shape == (1, 3, 4, 6)
    np.testing.assert_array_equal(out, x.detach().numpy())

    bf = torch.randn(3, 4, 6).to(torch.bfloat16)
    np.testing.assert_array_equal(_raw(image_to_proto(bf)), bf.float().numpy())

    with pytest.raises(ValueError, match="int64"):
        image_to_proto(torch.zeros(3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="accepted torch tensors"):
        image_to_proto(torch.zeros(4, 4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pass a list"):
        image_to_proto(torch.zeros(2, 3, 4, 4))


# --------------------------------------------------------------------------- one vs many


def test_single_image_vs_sequence() -> None:
    assert len(as_image_list(RGB)) == 1  # [H,W,3] is one image, not H rows
    assert len(as_image_list(b"abc")) == 1
    assert len(as_image_list("a.jpg")) == 1
    assert len(as_image_list(Path("a.jpg"))) == 1
    assert len(as_image_list(PIL_Image.fromarray(RGB))) == 1
    assert len(as_image_list([RGB, RGB])) == 2
    assert len(as_image_list((RGB, b"x", "p"))) == 3
    assert len(as_image_list(iter([RGB, RGB, RGB]))) == 3
    with pytest.raises(ValueError, match="no images"):
        as_image_list([])


def test_unsupported_types() -> None:
    with pytest.raises(TypeError, match="unsupported image type"):
        image_to_proto(42)
    with pytest.raises(TypeError, match=r"image 1: unsupported image type .*list"):
        images_to_proto([RGB, [RGB]])
    with pytest.raises(ValueError, match="image 1: "):
        images_to_proto([RGB, np.zeros((2, 2), np.float64)])


# --------------------------------------------------------------------------- request options


def test_nodes_forms() -> None:
    assert normalize_nodes("layer4") == (["layer4"], {})
    assert normalize_nodes(["a", "b"]) == (["a", "b"], {})
    assert normalize_nodes(("a",)) == (["a"], {})
    assert normalize_nodes({"layer4": "feat", "fc": "logits"}) == (
        ["layer4", "fc"],
        {"layer4": "feat", "fc": "logits"},
    )
    with pytest.raises(ValueError, match="no nodes"):
        normalize_nodes([])
    with pytest.raises(ValueError, match="more than once"):
        normalize_nodes(["a", "a"])
    with pytest.raises(ValueError, match="more than once"):
        normalize_nodes({"a": "k", "b": "k"})
    with pytest.raises(TypeError):
        normalize_nodes(["a", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        normalize_nodes(b"layer4")  # type: ignore[arg-type]


def test_pool_names() -> None:
    assert parse_pool(None) == pb.POOLING_RAW
    assert parse_pool("raw") == pb.POOLING_RAW
    assert parse_pool("GeM") == pb.POOLING_GEM
    assert parse_pool("cls") == pb.POOLING_CLS
    with pytest.raises(ValueError, match="valid: None, 'raw', 'avg', 'max', 'gem', 'cls', 'mean'"):
        parse_pool("median")


def test_build_extract_request() -> None:
    request, n = build_extract_request(
        [RGB, b"jpeg"],
        model="m",
        nodes={"layer4": "feat", "fc": "fc"},
        pool="gem",
        gem_p=4.0,
        normalize=True,
        dtype="bfloat16",
    )
    assert n == 2
    assert list(request.nodes) == ["layer4", "fc"]
    assert dict(request.aliases) == {"layer4": "feat", "fc": "fc"}
    assert request.output.pool == pb.POOLING_GEM
    assert request.output.gem_p == 4.0
    assert request.output.normalize is True
    assert request.output.dtype == "bfloat16"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"dtype": "float64"}, "unknown dtype"),
        ({"gem_p": 0.0}, "gem_p"),
        ({"gem_p": float("nan")}, "gem_p"),
        ({"model": ""}, "model"),
    ]
    for kwargs, match in cases:
        args: dict[str, Any] = {
            "model": "m",
            "nodes": "x",
            "pool": None,
            "gem_p": 3.0,
            "normalize": False,
            "dtype": "float32",
            **kwargs,
        }
        with pytest.raises(ValueError, match=match):
            build_extract_request(RGB, **args)


# --------------------------------------------------------------------------- output decoding


def test_decode_float_and_uint8_tensors_are_writable_native_copies() -> None:
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    for dtype, wire in [("float32", "<f4"), ("float16", "<f2")]:
        t = pb.Tensor(dtype=dtype, shape=[2, 3], data=x.astype(wire).tobytes())
        out = decode_tensor(t)
        assert out.flags.writeable and out.dtype.isnative
        np.testing.assert_array_equal(out, x.astype(wire))
    t = pb.Tensor(dtype="uint8", shape=[5, 7, 3], data=RGB.tobytes())
    np.testing.assert_array_equal(decode_tensor(t), RGB)


def test_bfloat16_decode_is_bit_exact() -> None:
    # bfloat16 bit patterns and the float32 values they denote.
    bits = np.array(
        [0x3F80, 0xC000, 0x4049, 0x0000, 0x8000, 0x7F80, 0x0001, 0x3EAB], dtype=np.uint16
    )
    expected = np.array(
        [1.0, -2.0, 3.140625, 0.0, -0.0, np.inf, 2.0**-133, 0.333984375], dtype=np.float32
    )
    t = pb.Tensor(dtype="bfloat16", shape=[8], data=bits.astype("<u2").tobytes())
    out = decode_tensor(t)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(
        bfloat16_to_float32(bits).view(np.uint32), bits.astype(np.uint32) << 16
    )


def test_bfloat16_nan_survives() -> None:
    t = pb.Tensor(dtype="bfloat16", shape=[1], data=np.uint16(0x7FC0).tobytes())
    assert np.isnan(decode_tensor(t)[0])


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (pb.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 23), "23 bytes.*need 24"),
        (pb.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 25), "25 bytes"),
        (pb.Tensor(dtype="int64", shape=[1], data=b"\0" * 8), "unknown dtype"),
        (pb.Tensor(dtype="float32", shape=[-1, 2], data=b""), "negative"),
    ],
)
def test_malformed_tensors_raise_service_error(tensor: pb.Tensor, match: str) -> None:
    with pytest.raises(FeatureServiceError, match=match) as info:
        decode_tensor(tensor)
    assert info.value.code is None
    assert str(info.value).startswith("INVALID_RESPONSE: malformed server response")


def _named(key: str, array: np.ndarray, node: str = "", layout: str = "NC") -> pb.NamedTensor:
    return pb.NamedTensor(
        key=key,
        node=node or key,
        tensor=pb.Tensor(
            dtype="float32",
            shape=list(array.shape),
            data=array.astype("<f4").tobytes(),
            layout=layout,
        ),
    )


def _response(per_image: list[list[pb.NamedTensor]]) -> pb.ExtractResponse:
    return pb.ExtractResponse(
        results=[pb.ImageResult(outputs=outs) for outs in per_image],
        metadata=pb.ExtractMetadata(
            model="m",
            weights_sha256="ab" * 32,
            device="cpu",
            batch_size=2,
            nodes=[pb.ResolvedNode(key="feat", requested="layer4", node="layer4.2.relu_2")],
            preprocessing=pb.Preprocessing(
                resize_size=232,
                crop_size=[224, 224],
                mean=[0.485, 0.456, 0.406],
                std=[0.229, 0.224, 0.225],
                interpolation="bilinear",
                antialias=True,
            ),
            timings=pb.Timings(queue_ms=1.0, decode_ms=2.0, compute_ms=3.0, total_ms=7.0),
        ),
    )


def test_parse_response_stacks_in_server_order() -> None:
    a = [RNG.standard_normal((4, 2, 2)).astype(np.float32) for _ in range(2)]
    b = [RNG.standard_normal((8,)).astype(np.float32) for _ in range(2)]
    resp = _response(
        [
            [_named("z_last", a[i], node="layer4.2.relu_2", layout="NCHW"), _named("a_first", b[i])]
            for i in range(2)
        ]
    )
    result = parse_extract_response(resp, 2)
    assert isinstance(result, ExtractResult)
    assert list(result) == ["z_last", "a_first"]  # server order, not sorted
    assert result["z_last"].shape == (2, 4, 2, 2)
    np.testing.assert_array_equal(result["z_last"], np.stack(a))
    np.testing.assert_array_equal(result["a_first"], np.stack(b))
    assert result["z_last"].flags.writeable
    assert result.layouts == {"z_last": "NCHW", "a_first": "NC"}
    assert result.nodes["z_last"] == "layer4.2.relu_2"
    assert len(result.per_image) == 2
    np.testing.assert_array_equal(result.per_image[1]["a_first"], b[1])
    assert np.shares_memory(result.per_image[1]["a_first"], result["a_first"])
    meta = result.metadata
    assert (meta.model, meta.device, meta.batch_size) == ("m", "cpu", 2)
    assert meta.nodes[0] == ("feat", "layer4", "layer4.2.relu_2")
    assert meta.nodes[0].node == "layer4.2.relu_2"
    assert meta.preprocessing.mean == (0.485, 0.456, 0.406)
    assert meta.preprocessing.crop_size == (224, 224)
    assert meta.timings.total_ms == 7.0
    assert "z_last" in repr(result)


def test_parse_response_ragged_shapes_give_a_list_per_image() -> None:
    resp = _response([[_named("k", np.zeros((2, 3)))], [_named("k", np.ones((2, 4)))]])
    result = parse_extract_response(resp, 2)
    assert list(result) == ["k"]
    assert result.is_ragged("k")
    ragged = result["k"]
    assert isinstance(ragged, list) and [a.shape for a in ragged] == [(2, 3), (2, 4)]
    np.testing.assert_array_equal(ragged[1], np.ones((2, 4)))
    assert result.arrays("k")[0] is result.per_image[0]["k"]
    with pytest.raises(ValueError, match=r"result\.arrays\(key\)"):
        result.array("k")
    assert result.per_image[1]["k"].shape == (2, 4)
    assert result.per_image[1]["k"].flags.writeable
    assert "list (ragged)" in repr(result)


@pytest.mark.parametrize(
    ("per_image", "n", "match"),
    [
        ([[_named("k", np.zeros(2))]], 2, "1 image results for 2 images"),
        ([[_named("k", np.zeros(2))], [_named("j", np.zeros(2))]], 2, "image 1 has outputs"),
        ([[_named("k", np.zeros(2)), _named("k", np.zeros(2))]], 1, "duplicate output keys"),
    ],
)
def test_parse_response_inconsistent(
    per_image: list[list[pb.NamedTensor]], n: int, match: str
) -> None:
    with pytest.raises(FeatureServiceError, match=match):
        parse_extract_response(_response(per_image), n)
