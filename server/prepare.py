"""Per-image work of the decode thread pool: decode + preprocess on the way in, tensor → bytes on
the way out. Plain values in and out, so the servicer stays free of torch and the worker thread
never spends time on JPEG decoding or serialisation.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import codec, thread_roles
from .errors import ImageLimitExceeded, InvalidImage, LayertapError
from .heads import Head
from .pooling import average_views, concat_parts, finish
from .preprocess import Geometry, Preprocessing, geometry, preprocess
from .process import pin_torch_threads
from .spec import Box, ImageInput, OutputSpec

log = logging.getLogger(__name__)
# Region boxes may poke this far (pixels) past the image's edge (rounding in the client's maths).
BOX_TOLERANCE = 1.0


@dataclass(frozen=True)
class View:
    """One model input of an image: the image itself, or a TTA view (flipped, rescaled)."""

    tensor: torch.Tensor  # float32 [3, h, w]
    boxes: torch.Tensor | None  # float32 [R, 4] in this view's input pixels, or None


@dataclass(frozen=True)
class Prepared:
    tensor: torch.Tensor  # float32 [3, H, W] model input (on the GPU when GPU-decoded)
    decode_s: float
    geometry: Geometry | None = None  # original pixels -> model input (None: not recorded)
    views: tuple[View, ...] = ()  # what goes to the batcher; empty: just `tensor`

    def inputs(self) -> tuple[View, ...]:
        return self.views or (View(self.tensor, None),)


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
    pin_torch_threads(1)
    thread_roles.register("decode")
    _thread.device = torch.device(gpu_decode_device) if gpu_decode_device else None
    _thread.stream = torch.cuda.Stream(_thread.device) if _thread.device is not None else None


def _decode_on_gpu(
    data: bytes, limits: codec.DecodeLimits, spec: Preprocessing, native: bool
) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
    """nvJPEG decode and preprocessing on this thread's stream; the stream is synchronised
    before returning, so the tensor is complete whenever the worker reads it. (None, None) when
    the image is not a JPEG nvJPEG decodes exactly (codec.decode_jpeg_cuda says which); else
    the tensor and the decoded image's (H, W)."""
    assert _thread.device is not None
    with torch.cuda.stream(_thread.stream):
        pixels = codec.decode_jpeg_cuda(data, limits, _thread.device)
        if pixels is None:
            return None, None
        tensor = preprocess(pixels, spec, native)
    _thread.stream.synchronize()
    return tensor, (int(pixels.shape[-2]), int(pixels.shape[-1]))


def _try_gpu_decode(
    data: bytes, limits: codec.DecodeLimits, spec: Preprocessing, native: bool
) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
    """_decode_on_gpu, or (None, None) when it fails for any reason but a limit (which the CPU
    path would refuse the same way): that image is then decoded on the CPU, so a JPEG the GPU
    path cannot handle (nvJPEG's own failures, a CUDA error) costs a CPU decode, never the
    request; the CPU decoder names what is wrong with a really bad image."""
    try:
        return _decode_on_gpu(data, limits, spec, native)
    except ImageLimitExceeded:
        raise
    except InvalidImage as exc:
        log.debug("GPU decode refused an image (%s); decoding it on the CPU", exc)
    except Exception:
        log.warning("GPU decode failed; decoding this image on the CPU", exc_info=True)
    return None, None


def prepare_image(
    image: ImageInput,
    limits: codec.DecodeLimits,
    spec: Preprocessing,
    native: bool = False,
    regions: Sequence[Box] = (),
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> Prepared:
    """Decode and preprocess one image; raw float32 input is already normalised and kept as is.
    `native`: normalise only (no resize, no crop). On a decode thread set up for GPU decode
    (init_decode_thread), plain JPEGs are decoded and preprocessed on the GPU.
    `regions` (original-image pixels) are checked and mapped to model-input pixels; `flip` and
    `scales` add TTA views (each one more item for the batcher)."""
    started = time.perf_counter()
    tensor: torch.Tensor | None = None
    size: tuple[int, int] | None = None
    if image.encoded is not None and _thread.device is not None:
        tensor, size = _try_gpu_decode(image.encoded, limits, spec, native)
    if tensor is None:
        if image.encoded is not None:
            pixels = codec.decode_encoded(image.encoded, limits)
        else:
            pixels = codec.decode_raw(image.dtype, image.shape, image.data, limits)
        size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        if pixels.dtype == torch.uint8:
            tensor = preprocess(pixels, spec, native)
        else:
            tensor = pixels.float()
            native = True  # raw float input: its coordinates are input coordinates
        if tensor.dim() != 3 or tensor.shape[0] != 3:
            raise InvalidImage(
                f"expected 3 channels after decoding, got shape {tuple(tensor.shape)}"
            )
        tensor = tensor.contiguous()
    assert size is not None
    geo = geometry(size[0], size[1], spec, native)
    boxes = map_boxes(regions, geo, native) if regions else None
    check_view_pixels(tensor, scales, limits)
    views = (
        make_views(tensor, boxes, flip, scales)
        if boxes is not None or flip or (tuple(scales) != (1.0,))
        else ()
    )
    return Prepared(tensor, time.perf_counter() - started, geo, views)


def input_pixels(
    image: ImageInput, limits: codec.DecodeLimits, native: bool, model_pixels: int
) -> tuple[int, int]:
    """(pixels of the model input this image becomes, uint8 bytes decoded at full size first)
    from its header or shape alone, for the memory estimate before decoding. Resized inputs
    are the model's size; native and raw float32 inputs keep theirs. (0, 0) when the header
    or shape is unusable: the decode that follows says what is wrong."""
    dims = list(image.shape)
    try:
        if image.encoded is not None:
            if not native:
                return model_pixels, 0
            width, height = codec.header_size(image.encoded, limits)
            return width * height, 3 * width * height
        if image.dtype == "float32" and len(dims) >= 2:
            return int(dims[-2]) * int(dims[-1]), 0
        if image.dtype == "uint8" and len(dims) == 3:
            return (int(dims[0]) * int(dims[1]) if native else model_pixels), 0
    except (LayertapError, TypeError, ValueError, OverflowError):
        pass
    return 0, 0


def view_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """(height, width) of the TTA view of an h x w input at `scale` (at least 1 x 1)."""
    if scale == 1.0:
        return h, w
    return max(1, round(h * scale)), max(1, round(w * scale))


def check_view_pixels(
    tensor: torch.Tensor, scales: Sequence[float], limits: codec.DecodeLimits
) -> None:
    """A TTA scale must not blow a view past the per-image pixel limit (native-resolution inputs
    scaled by up to 4 would otherwise reach 16 x max_image_pixels in the forward)."""
    h, w = int(tensor.shape[-2]), int(tensor.shape[-1])
    limit = max(limits.max_pixels, h * w)  # the model's own input size always runs
    for s in scales:
        sh, sw = view_size(h, w, s)
        if sh * sw > limit:
            raise ImageLimitExceeded(
                f"tta scale {s:g} makes a {sw}x{sh} = {sw * sh} pixel view of this {w}x{h} model "
                f"input, over the limit of {limit} pixels; use smaller scales, or a "
                "smaller image"
            )


def map_boxes(regions: Sequence[Box], geo: Geometry, native: bool) -> torch.Tensor:
    """Original-image boxes -> float32 [R, 4] model-input boxes, clipped to the input (the
    model never sees the rest). Raises InvalidImage naming the box; the caller adds the image."""
    h, w = geo.orig_hw
    ih, iw = geo.input_hw
    mapped: list[Box] = []
    for j, (x1, y1, x2, y2) in enumerate(regions):
        where = f"regions[{j}] ({x1:g}, {y1:g}, {x2:g}, {y2:g})"
        tol = BOX_TOLERANCE
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x1 >= x2 or y1 >= y2:
            raise InvalidImage(f"{where} is not a box: need finite x1 < x2 and y1 < y2")
        if x1 < -tol or y1 < -tol or x2 > w + tol or y2 > h + tol:
            raise InvalidImage(
                f"{where} is outside the image, which is {w}x{h} pixels (as decoded, after EXIF "
                f"rotation); boxes are x1, y1, x2, y2 in [0, {w}] x [0, {h}]"
            )
        bx1, by1, bx2, by2 = geo.to_input((max(x1, 0.0), max(y1, 0.0), min(x2, w), min(y2, h)))
        cx1, cy1, cx2, cy2 = max(bx1, 0.0), max(by1, 0.0), min(bx2, iw), min(by2, ih)
        if cx2 - cx1 <= 1e-3 or cy2 - cy1 <= 1e-3:
            hint = "" if native else "; send native_resolution=true to keep the whole image"
            raise InvalidImage(
                f"{where} lies entirely outside the model's {iw}x{ih} centre crop of this "
                f"image (resize and crop keep x in [{geo.offset[1] / geo.scale[1]:.1f}, "
                f"{(geo.offset[1] + iw) / geo.scale[1]:.1f}], y in "
                f"[{geo.offset[0] / geo.scale[0]:.1f}, {(geo.offset[0] + ih) / geo.scale[0]:.1f}]"
                f" of the original){hint}"
            )
        mapped.append((cx1, cy1, cx2, cy2))
    return torch.tensor(mapped, dtype=torch.float32).reshape(-1, 4)


def make_views(
    tensor: torch.Tensor, boxes: torch.Tensor | None, flip: bool, scales: Sequence[float]
) -> tuple[View, ...]:
    """TTA views, scale by scale (each with its flip after it when `flip`): a scale s is an
    antialiased bilinear resize of the model input to round(H s) x round(W s); boxes follow
    (scaled, mirrored)."""
    h, w = int(tensor.shape[-2]), int(tensor.shape[-1])
    views: list[View] = []
    for s in scales:
        if s == 1.0:
            t, b = tensor, boxes
        else:
            sh, sw = view_size(h, w, s)
            t = F.interpolate(
                tensor[None], size=(sh, sw), mode="bilinear", align_corners=False, antialias=True
            )[0].contiguous()
            b = None
            if boxes is not None:
                b = boxes * torch.tensor([sw / w, sh / h, sw / w, sh / h], dtype=boxes.dtype)
        views.append(View(t, b))
        if flip:
            fb = None
            if b is not None:
                vw = float(t.shape[-1])
                fb = torch.stack([vw - b[:, 2], b[:, 1], vw - b[:, 0], b[:, 3]], dim=1)
            views.append(View(torch.flip(t, [-1]).contiguous(), fb))
    return tuple(views)


def finish_image(
    views: Sequence[Mapping[str, torch.Tensor]],
    nodes: Sequence[str],
    spec: OutputSpec,
    heads: Mapping[str, Head],
    concat_name: str = "",
) -> dict[str, torch.Tensor]:
    """One image's pooled outputs from the worker, per view -> its answer: views averaged
    (TTA), parts concatenated (`concat_name` set), post chain, normalize and dtype. Raw outputs
    were finished on the worker and pass through. Runs in the decode pool, never the loop."""
    if spec.pool == "raw":
        return dict(views[0])
    merged: dict[str, torch.Tensor] = {}
    for name in nodes:
        parts = [v[name] for v in views]
        merged[name] = parts[0] if len(parts) == 1 else average_views(parts)
    if concat_name:
        return {concat_name: finish(concat_parts([merged[n] for n in nodes]), spec, heads)}
    return {name: finish(x, spec, heads) for name, x in merged.items()}


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


def finish_results(
    rows: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    nodes: Sequence[str],
    spec: OutputSpec,
    heads: Mapping[str, Head],
    concat_name: str = "",
) -> list[dict[str, EncodedTensor]]:
    """A request's worker outputs (per image, per view) -> finished (finish_image) and encoded
    rows, in one decode-pool call."""
    return encode_results([finish_image(views, nodes, spec, heads, concat_name) for views in rows])
