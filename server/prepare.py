"""Per-image work of the decode thread pool: decode + preprocess on the way in, tensor → bytes on
the way out. Plain values in and out, so the servicer stays free of torch and the worker thread
never spends time on JPEG decoding or serialisation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    tensor: torch.Tensor  # float32 [3, H, W] model input (on the GPU when GPU-decoded)
    decode_s: float


class _DecodeThread(threading.local):
    """Per decode-pool thread: the CUDA device JPEGs are decoded on (None: CPU decode) and this
    thread's own CUDA stream, so GPU decodes never queue behind (or race) the worker's forward
    on the default stream."""

    device: torch.device | None = None
    stream: Any = None


_thread = _DecodeThread()


def init_decode_thread(gpu_decode_device: str | None = None) -> None:
    """ThreadPoolExecutor initializer of the decode pool. torch runs single-threaded here: the
    pool itself is the parallelism, and the worker's intra-op threads own the cores."""
    torch.set_num_threads(1)
    _thread.device = torch.device(gpu_decode_device) if gpu_decode_device else None
    _thread.stream = torch.cuda.Stream(_thread.device) if _thread.device is not None else None


def _decode_on_gpu(
    data: bytes, limits: codec.DecodeLimits, spec: Preprocessing, native: bool
) -> torch.Tensor | None:
    """nvJPEG decode and preprocessing on this thread's stream; the stream is synchronised
    before returning, so the tensor is complete whenever the worker reads it. None when the
    image is not a JPEG nvJPEG decodes exactly (codec.decode_jpeg_cuda says which)."""
    assert _thread.device is not None
    with torch.cuda.stream(_thread.stream):
        pixels = codec.decode_jpeg_cuda(data, limits, _thread.device)
        if pixels is None:
            return None
        tensor = preprocess(pixels, spec, native).contiguous()
    _thread.stream.synchronize()
    return tensor


def prepare_image(
    image: ImageInput, limits: codec.DecodeLimits, spec: Preprocessing, native: bool = False
) -> Prepared:
    """Decode and preprocess one image; raw float32 input is already normalised and kept as is.
    `native`: normalise only (no resize, no crop). On a decode thread set up for GPU decode
    (init_decode_thread), plain JPEGs are decoded and preprocessed on the GPU."""
    started = time.perf_counter()
    if image.encoded is not None and _thread.device is not None:
        gpu = _decode_on_gpu(image.encoded, limits, spec, native)
        if gpu is not None:
            return Prepared(gpu, time.perf_counter() - started)
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
