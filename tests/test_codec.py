"""server/codec.py: real photos in every accepted format and mode, hostile inputs, raw tensors."""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image

from layertap.server.codec import (
    DTYPES,
    DecodeLimits,
    decode_encoded,
    decode_raw,
    decode_tensor_bytes,
    encode_tensor,
)
from layertap.server.errors import ImageLimitExceeded, InvalidArgument, InvalidImage

LIMITS = DecodeLimits()
PHOTOS = ["astronaut", "chelsea", "coffee", "china", "grace_hopper"]


@cache
def photo(name: str) -> np.ndarray:
    """HxWx3 uint8 RGB photo."""
    if name == "china":
        return load_sample_image("china.jpg")
    if name == "grace_hopper":
        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    return getattr(skimage.data, name)()


def save(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def hwc(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    # CHW or a channels-last view of HWC memory (what the decoders return): never other strides
    assert t.is_contiguous() or t.permute(1, 2, 0).is_contiguous()
    return t.permute(1, 2, 0).numpy()


def pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """Hand-made PNG (Pillow cannot write 16-bit RGB nor lie about its size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


# --- formats and modes -------------------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize(
    "fmt,kwargs",
    [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True})],
    ids=["png", "bmp", "webp-lossless"],
)
def test_lossless_formats_round_trip_exactly(name: str, fmt: str, kwargs: dict) -> None:
    rgb = photo(name)
    out = decode_encoded(save(Image.fromarray(rgb), fmt, **kwargs), LIMITS)
    np.testing.assert_array_equal(hwc(out), rgb)


@pytest.mark.parametrize("name", PHOTOS)
def test_jpeg_rgb_matches_pillow_and_source(name: str) -> None:
    rgb = photo(name)
    data = save(Image.fromarray(rgb), "JPEG", quality=95)
    out = hwc(decode_encoded(data, LIMITS))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - pil_rgb(data)).max() <= 2
    assert np.abs(out.astype(float) - rgb).mean() < 3


def test_jpeg_grayscale_and_cmyk() -> None:
    rgb = Image.fromarray(photo("coffee"))
    gray = save(rgb.convert("L"), "JPEG")
    out = hwc(decode_encoded(gray, LIMITS))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out[..., 0].astype(int) - pil_rgb(gray)[..., 0]).max() <= 2
    cmyk = save(rgb.convert("CMYK"), "JPEG", quality=95)
    out = hwc(decode_encoded(cmyk, LIMITS))
    assert np.abs(out.astype(int) - pil_rgb(cmyk)).max() <= 2
    assert np.abs(out.astype(float) - photo("coffee")).mean() < 6


def test_png_gray_gray_alpha_palette_rgba() -> None:
    rgb = photo("chelsea")
    im = Image.fromarray(rgb)
    gray = np.asarray(im.convert("L"))
    out = hwc(decode_encoded(save(im.convert("L"), "PNG"), LIMITS))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    # Alpha is dropped, not composited: colour values come back untouched.
    la = im.convert("LA")
    la.putalpha(Image.fromarray(np.random.default_rng(0).integers(0, 256, gray.shape, np.uint8)))
    out = hwc(decode_encoded(save(la, "PNG"), LIMITS))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    rgba = im.convert("RGBA")
    rgba.putalpha(0)  # fully transparent
    np.testing.assert_array_equal(hwc(decode_encoded(save(rgba, "PNG"), LIMITS)), rgb)
    pal = save(im.convert("P"), "PNG")
    np.testing.assert_array_equal(hwc(decode_encoded(pal, LIMITS)), pil_rgb(pal))


def test_png_16bit_gray_is_scaled_with_rounding() -> None:
    special = np.array([0, 128, 129, 257, 385, 386, 32767, 65278, 65535], dtype=np.uint16)
    scaled = (photo("astronaut")[..., 0].astype(np.uint16) * 257) + np.uint16(100)
    scaled = np.minimum(scaled, 65535).astype(np.uint16)
    scaled[0, : special.size] = special
    im = Image.fromarray(scaled)
    assert im.mode == "I;16"
    out = hwc(decode_encoded(save(im, "PNG"), LIMITS))
    expected = np.rint(scaled / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))
    assert out[0, : special.size, 0].tolist() == [0, 0, 1, 1, 1, 2, 127, 254, 255]
    # 386 -> 2 tells rounding from v >> 8 (1); 32767 -> 127 from a low-byte cast (255).
    assert out[0, 5, 0] == 2 and out[0, 6, 0] == 127


def test_png_16bit_rgb_is_scaled() -> None:
    rgb16 = photo("coffee")[:64, :80].astype(np.uint16) * 257 + 200
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    data = raw_png(80, 64, 16, 2, rows)
    out = hwc(decode_encoded(data, LIMITS))
    # Pillow hands 16-bit colour over as the high byte: v >> 8, within one level of v / 257.
    np.testing.assert_array_equal(out, (rgb16 >> 8).astype(np.uint8))
    assert np.abs(out.astype(int) - np.rint(rgb16 / 257.0)).max() <= 1


def test_corrupt_png_pixel_data_does_not_crash() -> None:
    """torchvision 0.29.1's decode_png segfaults on this; the codec must not route PNG there."""
    data = bytearray(save(Image.fromarray(photo("chelsea")), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 40] ^= 0xFF
    with pytest.raises(InvalidImage, match="PNG"):
        decode_encoded(bytes(data), LIMITS)


def test_webp_lossy_gif_and_animations_take_first_frame() -> None:
    rgb = photo("chelsea")
    im = Image.fromarray(rgb)
    lossy = save(im, "WEBP", quality=90)
    out = hwc(decode_encoded(lossy, LIMITS))
    assert out.shape == rgb.shape and np.abs(out.astype(float) - rgb).mean() < 4
    gif = save(im, "GIF")
    np.testing.assert_array_equal(hwc(decode_encoded(gif, LIMITS)), pil_rgb(gif))
    other = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    anim_gif = save(im, "GIF", save_all=True, append_images=[other], duration=100)
    np.testing.assert_array_equal(hwc(decode_encoded(anim_gif, LIMITS)), pil_rgb(gif))
    anim_webp = save(im, "WEBP", save_all=True, append_images=[other], lossless=True)
    np.testing.assert_array_equal(hwc(decode_encoded(anim_webp, LIMITS)), rgb)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_is_applied(orientation: int) -> None:
    im = Image.fromarray(photo("chelsea"))  # 300x451: rotations swap H and W
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(im, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as src:
        assert src.getexif()[0x0112] == orientation
        reference = np.asarray(ImageOps.exif_transpose(src).convert("RGB"))
    out = hwc(decode_encoded(data, LIMITS))
    h, w = photo("chelsea").shape[:2]
    assert out.shape[:2] == ((w, h) if orientation >= 5 else (h, w))
    assert np.abs(out.astype(int) - reference).max() <= 2


def test_accepts_bytearray_and_memoryview() -> None:
    data = save(Image.fromarray(photo("coffee")), "PNG")
    a = decode_encoded(bytearray(data), LIMITS)
    b = decode_encoded(memoryview(data), LIMITS)  # type: ignore[arg-type]
    assert torch.equal(a, b)


def test_thread_safe() -> None:
    blobs = [save(Image.fromarray(photo(n)), f) for n in PHOTOS for f in ("JPEG", "PNG", "BMP")]
    sequential = [decode_encoded(b, LIMITS) for b in blobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda b: decode_encoded(b, LIMITS), blobs * 3))
    for i, t in enumerate(parallel):
        assert torch.equal(t, sequential[i % len(blobs)])


# --- hostile input -----------------------------------------------------------------------------


def small_files() -> dict[str, bytes]:
    im = Image.fromarray(photo("chelsea")).resize((64, 48))
    return {
        "jpeg": save(im, "JPEG"),
        "png": save(im, "PNG"),
        "webp": save(im, "WEBP"),
        "gif": save(im, "GIF"),
        "bmp": save(im, "BMP"),
    }


def test_empty_and_random_bytes() -> None:
    with pytest.raises(InvalidImage, match="empty image data"):
        decode_encoded(b"", LIMITS)
    rng = random.Random(0)
    for n in (1, 2, 7, 100, 5000):
        with pytest.raises(InvalidImage, match="JPEG, PNG, WebP, GIF, BMP"):
            decode_encoded(bytes(rng.randrange(1, 256) for _ in range(n)), LIMITS)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "gif", "bmp"])
def test_truncated_files_are_invalid(fmt: str) -> None:
    data = small_files()[fmt]
    for cut in (len(data) // 2, len(data) * 9 // 10, 20, 8, 3):
        with pytest.raises(InvalidImage) as info:
            decode_encoded(data[:cut], LIMITS)
        assert "/" not in info.value.message.split("image")[0]  # no C++ source paths
        assert "__w" not in info.value.message


def test_truncated_real_jpeg_half() -> None:
    data = save(Image.fromarray(photo("astronaut")), "JPEG")
    with pytest.raises(InvalidImage, match="JPEG"):
        decode_encoded(data[: len(data) // 2], LIMITS)


def test_corrupted_files_never_raise_raw_errors() -> None:
    rng = random.Random(1)
    outcomes = set()
    for fmt, data in small_files().items():
        for _ in range(40):
            buf = bytearray(data)
            for _ in range(rng.randrange(1, 8)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            try:
                out = decode_encoded(bytes(buf), LIMITS)
                assert out.dtype == torch.uint8 and out.ndim == 3 and out.shape[0] == 3
                outcomes.add((fmt, "ok"))
            except (InvalidImage, ImageLimitExceeded) as e:
                outcomes.add((fmt, type(e).__name__))
    assert any(kind != "ok" for _, kind in outcomes)


def png_with_size(width: int, height: int) -> bytes:
    data = save(Image.fromarray(photo("chelsea")[:8, :8]), "PNG")
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + png_chunk(b"IHDR", ihdr) + data[33:]


def test_png_bomb_header_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused from the header alone: neither pixel decoder is ever called (they are replaced
    by ones that fail the test), rather than 'answered within a second'."""
    import layertap.server.codec as codec

    def never(*args: object) -> None:
        raise AssertionError("pixels were decoded for an image refused by its header")

    monkeypatch.setattr(codec, "_decode_torchvision", never)
    monkeypatch.setattr(codec, "_decode_pillow", never)
    data = png_with_size(100_000, 100_000)
    assert len(data) < 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not fire either
        with pytest.raises(ImageLimitExceeded, match=r"100000x100000.*40000000"):
            decode_encoded(data, LIMITS)
        # 10000x10000: above Pillow's own warning threshold (~89 MP), below its error threshold.
        with pytest.raises(ImageLimitExceeded, match="10000x10000"):
            decode_encoded(png_with_size(10_000, 10_000), LIMITS)


def test_jpeg_and_gif_bomb_headers() -> None:
    files = small_files()
    jpeg = bytearray(files["jpeg"])
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)
    with pytest.raises(ImageLimitExceeded, match="65500x65500"):
        decode_encoded(bytes(jpeg), LIMITS)
    gif = bytearray(files["gif"])
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    with pytest.raises(ImageLimitExceeded, match="65535x65535"):
        decode_encoded(bytes(gif), LIMITS)


def test_zero_size_header_is_invalid() -> None:
    with pytest.raises(InvalidImage):
        decode_encoded(png_with_size(0, 10), LIMITS)


def test_pixel_and_byte_limits() -> None:
    data = save(Image.fromarray(photo("astronaut")), "PNG")
    with pytest.raises(ImageLimitExceeded, match=r"512x512 = 262144 pixels.*262143"):
        decode_encoded(data, DecodeLimits(max_pixels=262_143))
    assert decode_encoded(data, DecodeLimits(max_pixels=262_144)).shape == (3, 512, 512)
    with pytest.raises(
        ImageLimitExceeded, match=rf"{len(data)} encoded bytes exceed max_image_bytes=1000"
    ):
        decode_encoded(data, DecodeLimits(max_encoded_bytes=1000))
    with pytest.raises(ValueError):
        DecodeLimits(max_pixels=0)


def test_tiff_and_avif_are_refused_clearly() -> None:
    tiff = save(Image.fromarray(photo("coffee")), "TIFF")
    with pytest.raises(InvalidImage, match=r"TIFF images are not supported.*PNG"):
        decode_encoded(tiff, LIMITS)
    fake_avif = b"\x00\x00\x00\x1cftypavif" + bytes(40)
    with pytest.raises(InvalidImage, match="AVIF"):
        decode_encoded(fake_avif, LIMITS)


# --- raw tensors -------------------------------------------------------------------------------


def test_decode_raw_uint8_hwc() -> None:
    rgb = photo("coffee")
    out = decode_raw("uint8", list(rgb.shape), rgb.tobytes(), LIMITS)
    assert out.dtype == torch.uint8 and out.is_contiguous()
    np.testing.assert_array_equal(hwc(out), rgb)


@pytest.mark.parametrize("shape", [[1, 3, 5, 7], [3, 5, 7]])
def test_decode_raw_float32_chw(shape: list[int]) -> None:
    x = np.random.default_rng(0).standard_normal(shape).astype("<f4")
    out = decode_raw("float32", shape, x.tobytes(), LIMITS)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 7) and out.is_contiguous()
    np.testing.assert_array_equal(out.numpy(), x.reshape(3, 5, 7))
    out.add_(1)  # writable, owns its memory


@pytest.mark.parametrize(
    "dtype,shape,nbytes,match",
    [
        ("uint8", [4, 4, 3], 47, "needs 48 bytes, got 47"),
        ("uint8", [3, 4, 4], 48, r"\[H, W, 3\]"),
        ("uint8", [4, 4], 16, r"\[H, W, 3\]"),
        ("float32", [4, 4, 3], 192, r"\[1, 3, H, W\] or \[3, H, W\]"),
        ("float32", [2, 3, 4, 4], 384, r"\[1, 3, H, W\]"),
        ("float16", [3, 4, 4], 96, "'uint8'.*'float32'"),
        ("int64", [4, 4, 3], 384, "'uint8'.*'float32'"),
        ("uint8", [0, 4, 3], 0, "empty size"),
        ("float32", [3, 4, -1], 0, "negative"),
        ("uint8", ["a", 4, 3], 0, "integers"),
    ],
)
def test_decode_raw_rejects_bad_input(dtype: str, shape: list, nbytes: int, match: str) -> None:
    with pytest.raises(InvalidImage, match=match):
        decode_raw(dtype, shape, bytes(nbytes), LIMITS)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_decode_raw_rejects_non_finite(bad: float) -> None:
    x = np.zeros((3, 4, 4), "<f4")
    x[1, 2, 3] = bad
    with pytest.raises(InvalidImage, match="NaN or infinite"):
        decode_raw("float32", [3, 4, 4], x.tobytes(), LIMITS)


@pytest.mark.parametrize("bad", [3e38, -2e4])
def test_decode_raw_rejects_huge_floats(bad: float) -> None:
    """Finite but far outside any normalised input: would overflow to NaN in the forward."""
    x = np.zeros((3, 4, 4), "<f4")
    x[2, 0, 1] = bad
    with pytest.raises(InvalidImage, match="magnitude"):
        decode_raw("float32", [3, 4, 4], x.tobytes(), LIMITS)
    x[2, 0, 1] = 255.0  # unnormalised pixel values still pass
    assert decode_raw("float32", [3, 4, 4], x.tobytes(), LIMITS).shape == (3, 4, 4)


def test_decode_raw_pixel_limit() -> None:
    with pytest.raises(ImageLimitExceeded, match="100x100"):
        decode_raw("uint8", [100, 100, 3], bytes(30000), DecodeLimits(max_pixels=9999))


def test_decode_raw_limit_checked_before_length() -> None:
    with pytest.raises(ImageLimitExceeded):
        decode_raw("float32", [3, 100_000, 100_000], b"", LIMITS)


def test_dtypes_table() -> None:
    assert DTYPES == {
        "uint8": torch.uint8,
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int8": torch.int8,
    }


def test_int8_wire_is_one_signed_byte_per_value() -> None:
    """Quantised descriptors: 1 byte each, two's complement, range [-127, 127] kept exactly."""
    t = torch.tensor([[-127, -1, 0], [1, 64, 127]], dtype=torch.int8)
    wire, shape, data = encode_tensor(t)
    assert (wire, shape) == ("int8", [2, 3])
    assert data == bytes([0x81, 0xFF, 0x00, 0x01, 0x40, 0x7F])
    assert np.array_equal(np.frombuffer(data, dtype=np.int8).reshape(2, 3), t.numpy())
    back = decode_tensor_bytes("int8", [2, 3], data)
    assert back.dtype == torch.int8 and torch.equal(back, t)
    with pytest.raises(InvalidArgument, match="needs 6 bytes, got 5"):
        decode_tensor_bytes("int8", [2, 3], data[:5])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (7,), (), (0, 5)])
def test_tensor_round_trip_bit_exact(dtype: str, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    if dtype == "uint8":
        t = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    elif dtype == "int8":
        t = torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)
    else:
        t = (torch.randn(shape, generator=g) * 1000).to(DTYPES[dtype])
    wire, wire_shape, data = encode_tensor(t)
    assert (wire, wire_shape) == (dtype, list(shape))
    assert isinstance(data, bytes) and len(data) == t.numel() * t.element_size()
    back = decode_tensor_bytes(wire, wire_shape, data)
    assert back.dtype == t.dtype and back.shape == t.shape
    if t.is_floating_point():
        assert torch.equal(
            back.view(torch.int16 if t.element_size() == 2 else torch.int32),
            t.view(torch.int16 if t.element_size() == 2 else torch.int32),
        )
    else:
        assert torch.equal(back, t)


def test_encode_is_little_endian_c_order_and_handles_views() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # non-contiguous
    wire, shape, data = encode_tensor(t)
    assert (wire, shape) == ("float32", [3, 2])
    np.testing.assert_array_equal(np.frombuffer(data, "<f4").reshape(3, 2), t.numpy())
    assert encode_tensor(torch.tensor([1.0]))[2] == b"\x00\x00\x80\x3f"
    bf = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert encode_tensor(bf)[2] == b"\x80\x3f\x00\xc0"  # bf16 = top 16 bits of float32
    assert encode_tensor(torch.tensor([1.0], dtype=torch.float16))[2] == b"\x00\x3c"
    with pytest.raises(ValueError, match="float64"):
        encode_tensor(torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "dtype,shape,nbytes,match",
    [
        ("float64", [2], 16, "unknown tensor dtype"),
        ("float32", [2, -1], 0, "negative"),
        ("float32", [2, 3], 23, "needs 24 bytes, got 23"),
        ("bfloat16", [4], 9, "needs 8 bytes"),
    ],
)
def test_decode_tensor_bytes_validates(dtype: str, shape: list, nbytes: int, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        decode_tensor_bytes(dtype, shape, bytes(nbytes))
