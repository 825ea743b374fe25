"""Per-image work of the decode thread pool: decode + preprocess on the way in, tensor → bytes on
the way out. Plain values in and out, so the servicer stays free of torch and the worker thread
never spends time on JPEG decoding or serialisation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import codec
from .errors import InvalidImage
from .preprocess import Preprocessing, preprocess


@dataclass(frozen=True)
class ImageInput:
    """One image as the client sent it: encoded bytes, or a raw tensor (dtype + shape + bytes)."""

    encoded: bytes | None = None
    dtype: str = ""
    shape: tuple[int, ...] = ()
    data: bytes = b""


@dataclass(frozen=True)
class Prepared:
    tensor: torch.Tensor  # float32 [3, H, W] model input
    decode_s: float


def prepare_image(
    image: ImageInput, limits: codec.DecodeLimits, spec: Preprocessing, native: bool = False
) -> Prepared:
    """Decode and preprocess one image; raw float32 input is already normalised and kept as is.
    `native`: normalise only (no resize, no crop)."""
    started = time.perf_counter()
    if image.encoded is not None:
        pixels = codec.decode_encoded(image.encoded, limits)
    else:
        pixels = codec.decode_raw(image.dtype, image.shape, image.data, limits)
    tensor = preprocess(pixels, spec, native) if pixels.dtype == torch.uint8 else pixels.float()
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise InvalidImage(f"expected 3 channels after decoding, got shape {tuple(tensor.shape)}")
    return Prepared(tensor.contiguous(), time.perf_counter() - started)


@dataclass(frozen=True)
class EncodedTensor:
    dtype: str
    shape: list[int]
    data: bytes


def encode_results(results: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, EncodedTensor]]:
    """Worker outputs (CPU tensors per image and node) → raw little-endian bytes."""
    encoded: list[dict[str, EncodedTensor]] = []
    for per_image in results:
        row = {}
        for name, tensor in per_image.items():
            dtype, shape, data = codec.encode_tensor(tensor)
            row[name] = EncodedTensor(dtype, shape, data)
        encoded.append(row)
    return encoded
