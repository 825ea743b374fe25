"""Bytes <-> tensors: image decoding for requests and raw tensor (de)serialisation for replies.

Knows nothing of gRPC or protobuf so it can be tested, fuzzed and reused on its own. Every
failure becomes a domain error (InvalidImage / ImageLimitExceeded / InvalidArgument) with a message
fit for the client; no decoder exception escapes.

Decoding policy:
- Size is read from the file header first (Pillow plugin classes, no pixel decode) so decompression
  bombs are refused before any large allocation.
- JPEG and still WebP are decoded by torchvision (libjpeg-turbo/libwebp, ~3x faster than Pillow
  on large JPEGs; both survived 5,000 mutated files each). PNG is NOT: torchvision 0.29.1's
  decode_png segfaults the whole process on a libpng error inside the pixel data (e.g. one flipped
  IDAT byte), so PNG goes to Pillow, as do GIF (first frame only), animated WebP (first frame) and
  BMP. Pillow decodes lazily and never the whole animation.
- EXIF orientation is applied. Alpha is dropped (not composited), exactly like the
  ``Image.convert("RGB")`` loaders most torchvision models were trained and evaluated with.
- 16-bit PNG: grayscale samples are scaled to 8 bits with rounding (``round(v / 257)``);
  16-bit colour PNGs come from Pillow already reduced to their high byte (``v >> 8``, within
  one level of rounding). Never truncated to the low byte.
- TIFF, AVIF and HEIC are refused with a clear message (large, rarely needed decoder surface).
- A JPEG cut short before its end-of-image marker is refused; a JPEG whose entropy data is damaged
  but still terminated may decode with libjpeg's grey fill, which cannot be told from a real image.

All functions are pure and hold no shared state, so they are safe in a thread pool.
"""

from __future__ import annotations

import io
import logging
import math
import re
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
)
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .errors import ImageLimitExceeded, InvalidArgument, InvalidImage
from .spec import DecodeLimits, check_encoded_size

log = logging.getLogger(__name__)

# torchvision 0.29 warns on every decode call that its decoders are deprecated (in favour of
# torchcodec). Known and deliberate here; silence exactly that message so `-W error` or dev mode
# does not turn every JPEG into an error. Narrow on purpose: message, category and module.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
    module=r"torchvision\.io\.image",
)

__all__ = [
    "DTYPES",
    "DecodeLimits",
    "decode_encoded",
    "decode_raw",
    "decode_tensor_bytes",
    "encode_tensor",
]


# Wire dtype names -> torch dtypes. Little-endian, C order on the wire.
DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    # scalar-quantised L2 descriptors (round(127 x)): 1 byte per value for index builders
    "int8": torch.int8,
}
_WIRE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# numpy views used for byte order; bfloat16 has no numpy dtype, its bits travel as int16.
_NP_WIRE: dict[str, np.dtype] = {
    "uint8": np.dtype("u1"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
}

ACCEPTED_FORMATS = "JPEG, PNG, WebP, GIF, BMP"

# PNG deliberately absent: torchvision segfaults on corrupt PNG pixel data (module docstring).
_TORCHVISION_FORMATS = frozenset({"JPEG", "WEBP"})
_PIL_CLASSES: dict[str, type[ImageFile.ImageFile]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
}
# What GetServerInfo advertises: the encoded formats above, and the raw tensor dtypes decode_raw
# takes (uint8 HWC pixels, float32 CHW already normalised).
IMAGE_FORMATS: tuple[str, ...] = tuple(name.lower() for name in _PIL_CLASSES)
RAW_INPUT_DTYPES: tuple[str, ...] = ("uint8", "float32")


def _sniff(data: bytes) -> str:
    """Format from magic bytes; refuses known-but-unsupported and unknown formats clearly."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        raise InvalidImage(
            f"TIFF images are not supported; send one of: {ACCEPTED_FORMATS} "
            "(PNG keeps TIFF's lossless pixels)"
        )
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace")
        raise InvalidImage(
            f"ISO-BMFF images (brand {brand!r}: AVIF/HEIC) are not supported; "
            f"send one of: {ACCEPTED_FORMATS}"
        )
    raise InvalidImage(
        f"unrecognised image format (first bytes {data[:8].hex()}); "
        f"send one of: {ACCEPTED_FORMATS}, or a raw tensor"
    )


def _check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image header declares an empty image ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageLimitExceeded(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_pixels} pixels; downscale it before sending"
        )


def _probe(data: bytes, fmt: str, limits: DecodeLimits) -> ImageFile.ImageFile:
    """Parse the header only (no pixel decode) and enforce the pixel limit.

    The plugin class is constructed directly instead of via ``Image.open`` so Pillow's global
    ``MAX_IMAGE_PIXELS`` check neither warns nor has to be mutated process-wide.
    """
    try:
        im = _PIL_CLASSES[fmt](io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageLimitExceeded(
            f"{fmt} image is too large to decode safely ({e}); the limit is "
            f"{limits.max_pixels} pixels"
        ) from None
    except Exception as e:  # Pillow raises SyntaxError, OSError, struct.error, ... on bad headers
        raise InvalidImage(
            f"corrupt or truncated {fmt} header ({_clean(e)}); send one of: {ACCEPTED_FORMATS}"
        ) from None
    width, height = im.size
    _check_pixels(width, height, limits)
    return im


_TV_PREFIX = re.compile(r"^\S+, \S+:\d+, ")


def _clean(e: BaseException) -> str:
    """Decoder message without C++ source paths, on one short line."""
    text = str(e).strip() or type(e).__name__
    text = _TV_PREFIX.sub("", text)
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    return text[:200]


def _decode_torchvision(data: bytes, fmt: str) -> torch.Tensor:
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # writable copy: no warning
    try:
        img = decode_image(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception as e:  # torchvision raises RuntimeError with the decoder's message
        raise InvalidImage(
            f"cannot decode {fmt} image: {_clean(e)} (corrupt or truncated data?)"
        ) from None
    if img.ndim == 4:  # animated formats come back as [N, C, H, W]: keep the first frame
        img = img[0]
    if img.dtype == torch.uint16:  # 16-bit samples: scale with rounding, round(v / 257)
        img = ((img.to(torch.int32) + 128) // 257).to(torch.uint8)
    elif img.dtype != torch.uint8:
        raise InvalidImage(f"{fmt} image decoded to unsupported sample type {img.dtype}")
    return img


def _decode_pillow(im: ImageFile.ImageFile, fmt: str) -> torch.Tensor:
    try:
        im.seek(0)  # first frame only
        frame = ImageOps.exif_transpose(im)
        if frame.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale PNG
            wide = np.clip(np.asarray(frame).astype(np.int64), 0, 65535)
            gray = ((wide + 128) // 257).astype(np.uint8)  # round(v / 257)
            arr = np.repeat(gray[:, :, None], 3, axis=2)
        else:
            arr = np.array(frame.convert("RGB"), dtype=np.uint8)  # writable copy
    except Image.DecompressionBombError as e:
        raise ImageLimitExceeded(f"{fmt} image is too large to decode safely ({e})") from None
    except Exception as e:  # OSError for truncation, ValueError, SyntaxError, ...
        raise InvalidImage(
            f"cannot decode {fmt} image: {_clean(e)} (corrupt or truncated data?)"
        ) from None
    return torch.from_numpy(arr).permute(2, 0, 1)  # channels-last view, like torchvision's


def decode_encoded(data: bytes, limits: DecodeLimits) -> torch.Tensor:
    """Encoded image file -> uint8 [3, H, W] RGB tensor, EXIF orientation applied.

    Often a channels-last view (torchvision's decoders return HWC memory): not made contiguous
    here, because the uint8 resize kernel works on that layout and a transpose copy of the
    full-size image would cost more than the whole resize.

    Raises InvalidImage for anything undecodable and ImageLimitExceeded for oversize input;
    limits are checked on the encoded length and the header's size before decoding pixels.
    """
    if not isinstance(data, bytes):
        data = bytes(data)  # bytearray / memoryview from the transport
    if len(data) == 0:
        raise InvalidImage("empty image data")
    check_encoded_size(len(data), limits)
    fmt = _sniff(data)
    im = _probe(data, fmt, limits)
    animated_webp = fmt == "WEBP" and bool(getattr(im, "is_animated", False))
    if fmt in _TORCHVISION_FORMATS and not animated_webp:
        im.close()
        img = _decode_torchvision(data, fmt)
    else:
        try:
            img = _decode_pillow(im, fmt)
        finally:
            im.close()
    if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] == 0 or img.shape[2] == 0:
        raise InvalidImage(f"{fmt} image decoded to an unusable shape {list(img.shape)}")
    # The decoded frame can exceed the header's canvas (GIF frames may grow it): check again.
    _check_pixels(int(img.shape[2]), int(img.shape[1]), limits)
    if not (img.is_contiguous() or img.permute(1, 2, 0).is_contiguous()):
        img = img.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # EXIF-rotated: HWC memory
    return img


def decode_jpeg_cuda(
    data: bytes, limits: DecodeLimits, device: torch.device
) -> torch.Tensor | None:
    """A plain RGB or gray JPEG decoded by nvJPEG on `device` (uint8 [3, H, W] there), after the
    same byte and header-pixel checks as decode_encoded. None for anything nvJPEG would get wrong
    or not handle — other formats, CMYK, EXIF-rotated JPEGs (the CUDA decoder ignores the
    orientation), an EXIF block Pillow cannot read, and any JPEG nvJPEG fails on — which the
    caller decodes on the CPU instead (decode_encoded: it decodes what libjpeg can, and names
    what is wrong with the rest)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) == 0:
        raise InvalidImage("empty image data")
    check_encoded_size(len(data), limits)
    if _sniff(data) != "JPEG":
        return None
    im = _probe(data, "JPEG", limits)
    try:
        if im.mode not in ("RGB", "L") or im.getexif().get(0x0112, 1) != 1:
            return None
    except Exception:  # a malformed EXIF block (SyntaxError, struct.error, ...): the CPU's turn
        log.debug("EXIF unreadable before a GPU decode; decoding on the CPU", exc_info=True)
        return None
    finally:
        im.close()
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        img = decode_jpeg(buf, mode=ImageReadMode.RGB, device=device)
    except Exception as e:  # nvJPEG refuses some JPEGs libjpeg decodes (and the CPU names bad ones)
        log.debug("nvJPEG could not decode a JPEG (%s); decoding on the CPU", _clean(e))
        return None
    if img.ndim != 3 or img.shape[0] != 3:
        return None
    return img


def _parse_shape(shape: Sequence[int], error: type[InvalidArgument]) -> list[int]:
    try:
        dims = [int(d) for d in shape]
    except (TypeError, ValueError):
        raise error(f"shape must be a list of integers, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise error(f"shape {dims} has a negative dimension")
    return dims


def _from_wire(
    dtype: str, dims: list[int], data: bytes, error: type[InvalidArgument]
) -> torch.Tensor:
    """Validated little-endian bytes -> CPU tensor of `dims` (a fresh, writable copy)."""
    np_wire = _NP_WIRE[dtype]
    expected = math.prod(dims) * np_wire.itemsize
    if len(data) != expected:
        raise error(f"{dtype} tensor of shape {dims} needs {expected} bytes, got {len(data)}")
    arr = np.frombuffer(data, dtype=np_wire).astype(np_wire.newbyteorder("="), copy=True)
    t = torch.from_numpy(arr).reshape(dims)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t


MAX_RAW_FLOAT = 1e4
"""Largest |value| of a raw float32 image (normalised inputs are within a few units)."""


def decode_raw(dtype: str, shape: Sequence[int], data: bytes, limits: DecodeLimits) -> torch.Tensor:
    """Raw image tensor -> uint8 [3, H, W] or float32 [3, H, W] (contiguous).

    uint8 must be HWC RGB, shape [H, W, 3]. float32 must be [1, 3, H, W] or [3, H, W] and already
    normalised: the float32 dtype of the result is what tells callers to skip preprocessing.
    Non-finite floats are refused, since they would poison every output silently, and so are
    magnitudes over MAX_RAW_FLOAT: no normalised input comes near it, and values near the float32
    limit overflow inside the forward into NaN outputs.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    dims = _parse_shape(shape, InvalidImage)
    if dtype == "uint8":
        if len(dims) != 3 or dims[2] != 3:
            raise InvalidImage(f"raw uint8 image must have shape [H, W, 3] (RGB, HWC), got {dims}")
        h, w = dims[0], dims[1]
    elif dtype == "float32":
        if not (
            (len(dims) == 4 and dims[0] == 1 and dims[1] == 3) or (len(dims) == 3 and dims[0] == 3)
        ):
            raise InvalidImage(
                f"raw float32 image must have shape [1, 3, H, W] or [3, H, W] "
                f"(normalised, CHW), got {dims}"
            )
        h, w = dims[-2], dims[-1]
    else:
        raise InvalidImage(
            f"raw image dtype must be 'uint8' ([H, W, 3]) or 'float32' ([3, H, W]), got {dtype!r}"
        )
    if h <= 0 or w <= 0:
        raise InvalidImage(f"raw image has an empty size {h}x{w} in shape {dims}")
    if h * w > limits.max_pixels:
        raise ImageLimitExceeded(
            f"raw image is {w}x{h} = {h * w} pixels, over the limit of {limits.max_pixels} pixels"
        )
    t = _from_wire(dtype, dims, data, InvalidImage)
    if dtype == "uint8":
        return t.permute(2, 0, 1).contiguous()
    t = t.reshape(3, h, w)
    if not bool(torch.isfinite(t).all()):
        raise InvalidImage("raw float32 image contains NaN or infinite values")
    peak = float(t.abs().max())
    if peak > MAX_RAW_FLOAT:
        raise InvalidImage(
            f"raw float32 image has a value of magnitude {peak:.3g}, over {MAX_RAW_FLOAT:g}; "
            "send normalised model input ((x/255 - mean) / std), or uint8 pixels"
        )
    return t.contiguous()


def encode_tensor(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    """Tensor -> (wire dtype, shape, raw little-endian C-order bytes); never pickle.

    Accepts float32/float16/bfloat16/uint8/int8 on any device; bfloat16 bits travel as int16.
    """
    wire = _WIRE_NAMES.get(t.dtype)
    if wire is None:
        raise ValueError(f"cannot encode dtype {t.dtype}; supported: {', '.join(DTYPES)}")
    cpu = t.detach().to("cpu").contiguous()
    if wire == "bfloat16":
        cpu = cpu.view(torch.int16)
    arr = cpu.numpy()
    if sys.byteorder != "little":
        arr = arr.astype(_NP_WIRE[wire])
    return wire, list(t.shape), arr.tobytes()


def decode_tensor_bytes(dtype: str, shape: Sequence[int], data: bytes) -> torch.Tensor:
    """Inverse of encode_tensor: wire dtype, shape and bytes -> CPU tensor.

    Raises InvalidArgument for an unknown dtype, a negative dimension or a byte length that does
    not match the shape.
    """
    if dtype not in DTYPES:
        raise InvalidArgument(
            f"unknown tensor dtype {dtype!r}; expected one of: {', '.join(DTYPES)}"
        )
    if not isinstance(data, bytes):
        data = bytes(data)
    return _from_wire(dtype, _parse_shape(shape, InvalidArgument), data, InvalidArgument)


def header_size(data: bytes, limits: DecodeLimits) -> tuple[int, int]:
    """(width, height) from the header alone (no pixel decode), after the byte and pixel
    checks: what the memory estimate needs before anything is decoded."""
    check_encoded_size(len(data), limits)
    im = _probe(data, _sniff(data), limits)
    size = im.size
    im.close()
    return size
