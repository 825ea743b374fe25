"""The model's input transform, torchvision's ImageClassification preset on tensors.

Same steps and arithmetic as ``weights.transforms()``: resize the shorter side (antialiased),
centre crop (zero-padding when too small), scale to [0, 1], normalise. ``resize_mode = "squash"``
resizes to a fixed height and width instead, ignoring the aspect ratio (Hugging Face image
processors with a ``{height, width}`` size, timm's ``crop_mode = "squash"``). The resize kernel is a
per-model choice (`Preprocessing.resize_kernel`):

- ``"uint8"`` (default): torchvision v2's native uint8 kernel (a port of Pillow's resampling, the
  resize the weights were trained and evaluated with through PIL images). About 6x cheaper than
  the float path on CPU; differs from ``weights.transforms()`` applied to a uint8 *tensor* by at
  most one uint8 level per pixel (measured on the test photos).
- ``"float"``: ``weights.transforms()`` on a tensor bit for bit (v1 resize converts to float,
  resizes and rounds back to uint8), for users who compare against embeddings computed that way.

Where no native uint8 kernel exists (CUDA tensors, bicubic without AVX2) the v2 function
itself falls back to the float path.

One deliberate departure: when the resized image would be huge (very thin inputs such as 1x4000,
whose shorter side is scaled up 256x), only the strip that survives the centre crop is resized.
The result then matches torchvision up to sub-pixel alignment instead of bit-for-bit, but memory
stays bounded; ordinary aspect ratios (up to ~64:1 at 256 px) take the exact path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as F
import torchvision.transforms.v2.functional as F2
from torchvision.transforms import InterpolationMode

from .errors import InvalidImage
from .settings import RESIZE_KERNELS

__all__ = ["Geometry", "Preprocessing", "geometry", "preprocess"]

# Above this many resized pixels, resize only the centre strip (see module docstring).
_MAX_RESIZED_PIXELS = 1 << 22

_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
RESIZE_MODES = ("shorter", "squash")
# Where an odd margin puts the centre crop: torchvision's round((size - crop) / 2) ("round") or
# Hugging Face image processors' (size - crop) // 2 ("floor"), one pixel apart in some sizes.
CROP_OFFSETS = ("round", "floor")
# Kernel radius in input pixels at scale 1 (antialiased downscaling widens it by the scale).
_KERNEL_RADIUS = {"bilinear": 1.0, "bicubic": 2.0, "nearest": 1.0}


@dataclass(frozen=True)
class Preprocessing:
    """What the model expects: resize shorter side, centre crop, normalise.

    Frozen and hashable so it can key caches and be reported verbatim by DescribeModel.
    """

    resize_size: int | None  # shorter side resized to this (None or 0: no resize)
    crop_size: tuple[int, int]  # centre crop (H, W) = model input size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # "bilinear" | "bicubic" | "nearest"
    antialias: bool = True
    resize_kernel: str = "uint8"  # "uint8" (fast, Pillow-like) | "float" (v1 tensor-exact)
    # "shorter": the shorter side becomes resize_size (aspect kept); "squash": the image becomes
    # resize_size scaled to the crop's shape (square crop: resize_size x resize_size)
    resize_mode: str = "shorter"
    crop_offset: str = "round"  # CROP_OFFSETS

    def __post_init__(self) -> None:
        if self.resize_size == 0:
            object.__setattr__(self, "resize_size", None)
        if self.resize_size is not None and self.resize_size < 0:
            raise ValueError(f"resize_size must be positive or None, got {self.resize_size}")
        if len(self.crop_size) != 2 or min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be two positive ints (H, W), got {self.crop_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values, got {self.mean} and {self.std}")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must be non-zero, got {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"resize_mode must be one of {list(RESIZE_MODES)}, got {self.resize_mode!r}"
            )
        if self.crop_offset not in CROP_OFFSETS:
            raise ValueError(
                f"crop_offset must be one of {list(CROP_OFFSETS)}, got {self.crop_offset!r}"
            )
        if self.resize_kernel not in RESIZE_KERNELS:
            raise ValueError(
                f"resize_kernel must be one of {list(RESIZE_KERNELS)}, got {self.resize_kernel!r}"
            )

    @classmethod
    def from_torchvision(cls, transforms: object) -> Preprocessing:
        """From ``weights.transforms()`` (ImageClassification preset); needs no weight download."""
        crop_attr = getattr(transforms, "crop_size", None)
        mean_attr = getattr(transforms, "mean", None)
        std_attr = getattr(transforms, "std", None)
        if crop_attr is None or mean_attr is None or std_attr is None:
            raise ValueError(
                f"{type(transforms).__name__} is not an image-classification preset "
                "(needs crop_size, resize_size, mean, std)"
            )
        crop = [crop_attr] if isinstance(crop_attr, int) else list(crop_attr)
        resize = getattr(transforms, "resize_size", None)
        mean = tuple(float(m) for m in mean_attr)
        std = tuple(float(s) for s in std_attr)
        if len(crop) == 1:
            crop = [crop[0], crop[0]]
        if isinstance(resize, (list, tuple)):
            if len(resize) != 1:
                raise ValueError(f"only a shorter-side resize is supported, got {resize}")
            resize = resize[0]
        interp = getattr(transforms, "interpolation", InterpolationMode.BILINEAR)
        interp_name = interp.value if isinstance(interp, InterpolationMode) else str(interp)
        antialias = getattr(transforms, "antialias", True)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"expected 3-channel mean/std, got {mean} and {std}")
        return cls(
            resize_size=None if resize is None else int(resize),
            crop_size=(int(crop[0]), int(crop[1])),
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            interpolation=interp_name,
            antialias=bool(antialias),  # torchvision treats None as False for tensors
        )

    def squash_size(self) -> tuple[int, int]:
        """(H, W) a squash resize produces: resize_size scaled to the crop's aspect."""
        assert self.resize_size is not None
        ch, cw = self.crop_size
        short = min(ch, cw)
        return round(self.resize_size * ch / short), round(self.resize_size * cw / short)

    def describe(self) -> str:
        """One line for logs and DescribeModel."""
        if self.resize_size is None:
            resize = "no resize"
        else:
            aa = " antialias" if self.antialias and self.interpolation != "nearest" else ""
            size = (
                f"{self.resize_size}"
                if self.resize_mode == "shorter"
                else "{}x{} (squash)".format(*self.squash_size())
            )
            resize = f"resize {size} {self.interpolation} ({self.resize_kernel}{aa})"
        h, w = self.crop_size
        mean = ", ".join(f"{m:g}" for m in self.mean)
        std = ", ".join(f"{s:g}" for s in self.std)
        offset = "" if self.crop_offset == "round" else f" (offset {self.crop_offset})"
        return f"{resize}, center-crop {h}x{w}{offset}, normalize mean=({mean}) std=({std})"


def _resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Same arithmetic as torchvision's ``_compute_resized_output_size`` for a one-int size."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


def _interpolate(
    x: torch.Tensor,
    spec: Preprocessing,
    size: tuple[int, int] | None = None,
    scale_factor: tuple[float, float] | None = None,
) -> torch.Tensor:
    """torch interpolate with the arguments torchvision's tensor resize passes."""
    mode = spec.interpolation
    return torch.nn.functional.interpolate(
        x,
        size=size,
        scale_factor=scale_factor,
        mode=mode,
        align_corners=False if mode in ("bilinear", "bicubic") else None,
        antialias=spec.antialias and mode in ("bilinear", "bicubic"),
        recompute_scale_factor=False if scale_factor is not None else None,
    )


def _resize_center_strip(
    image: torch.Tensor, out_hw: tuple[int, int], spec: Preprocessing
) -> torch.Tensor:
    """Resize only the part of the long axis that the centre crop keeps.

    Separable, in float like torchvision's tensor resize: the long axis at torchvision's exact
    scale (``scale_factor`` with ``recompute_scale_factor=False``), on a window whose start maps
    to an integer output position when one can be found cheaply (then the result equals the full
    resize up to float rounding; otherwise it is off by under half an output pixel), then the
    short axis exactly as torchvision does it. Returns the long axis already cropped to the crop
    length, so the following centre crop only trims the short axis.
    """
    axis = 2 if out_hw[0] > out_hw[1] else 3  # long axis, in NCHW
    in_len = int(image.shape[axis - 1])
    out_len, out_short = (out_hw[0], out_hw[1]) if axis == 2 else (out_hw[1], out_hw[0])
    crop_len = spec.crop_size[axis - 2]
    c0 = _crop_start(out_len, crop_len, spec.crop_offset)
    scale = in_len / out_len  # input pixels per output pixel
    margin = _KERNEL_RADIUS[spec.interpolation] * max(1.0, scale) + 2.0
    a_max = max(0, math.floor(c0 * scale - margin))
    b = min(in_len, math.ceil((c0 + crop_len) * scale + margin))
    # Output position of input pixel a is a * q / p; pick a (<= a_max) where that is an integer,
    # or nearly, searching no further than the pixel budget allows.
    g = math.gcd(in_len, out_len)
    p, q = in_len // g, out_len // g
    in_short = int(image.shape[1 if axis == 3 else 2])
    max_window = int(_MAX_RESIZED_PIXELS / (in_short * (1.0 + 1.0 / scale)))  # input + output
    search = max(0, max_window - (b - a_max))
    a, best = a_max, p
    for cand in range(a_max, max(-1, a_max - search - 1), -1):
        r = (cand * q) % p
        dist = min(r, p - r)
        if dist < best:
            a, best = cand, dist
            if dist == 0:
                break
    shift = round(a * q / p)  # output index of the window's first output pixel
    x = image[None].narrow(axis, a, b - a).to(torch.float32)
    sf = out_len / in_len
    # Long axis last: torch 2.14's antialiased interpolate with scale_factor mis-resizes H when W
    # is 1 (returns the first row), while the W pass with H == 1 is right.
    if axis == 2:
        x = _interpolate(x.transpose(2, 3), spec, scale_factor=(1.0, sf)).transpose(2, 3)
    else:
        x = _interpolate(x, spec, scale_factor=(1.0, sf))
    start = min(max(c0 - shift, 0), int(x.shape[axis]) - crop_len)
    x = x.narrow(axis, start, crop_len)
    size = (out_short, crop_len) if axis == 3 else (crop_len, out_short)
    x = _interpolate(x, spec, size=size)
    if spec.interpolation == "bicubic":
        x = x.clamp(0, 255)
    return x.round().to(torch.uint8)[0]


@dataclass(frozen=True)
class Geometry:
    """Where the original image's pixels land in the model input: input = original * scale -
    offset, per axis (continuous pixel coordinates, the image spanning [0, W] x [0, H]). Region
    boxes sent in original-image pixels are mapped with it."""

    orig_hw: tuple[int, int]  # the decoded image (after EXIF rotation), H, W
    input_hw: tuple[int, int]  # the model input, H, W
    scale: tuple[float, float] = (1.0, 1.0)  # y, x
    offset: tuple[float, float] = (0.0, 0.0)  # top, left (negative: the crop zero-pads)

    def to_input(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) in original pixels -> model-input pixels (not clipped)."""
        (sy, sx), (top, left) = self.scale, self.offset
        x1, y1, x2, y2 = box
        return (x1 * sx - left, y1 * sy - top, x2 * sx - left, y2 * sy - top)


def geometry(h: int, w: int, spec: Preprocessing, native: bool = False) -> Geometry:
    """The resize + centre crop `preprocess` applies to an h x w image, as a Geometry (the same
    arithmetic as torchvision's resize and center_crop; the thin-image strip path agrees to
    sub-pixel precision)."""
    if native:
        return Geometry((h, w), (h, w))
    if spec.resize_size is None:
        rh, rw = h, w
    elif spec.resize_mode == "squash":
        rh, rw = spec.squash_size()
    else:
        rh, rw = _resized_size(h, w, spec.resize_size)
    ch, cw = spec.crop_size

    top, left = (_crop_start(rh, ch, spec.crop_offset), _crop_start(rw, cw, spec.crop_offset))
    return Geometry((h, w), (ch, cw), (rh / h, rw / w), (float(top), float(left)))


def _crop_start(size: int, crop: int, offset: str) -> int:
    """The centre crop's first pixel along one axis (negative: zero padding before it)."""
    if crop > size:  # torchvision pads (crop - size) // 2 before, then crops at 0
        return -((crop - size) // 2)
    return (size - crop) // 2 if offset == "floor" else round((size - crop) / 2.0)


def _center_crop(img: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """torchvision's center_crop, or with crop_offset "floor" the same padding and a floored
    offset (Hugging Face image processors)."""
    if spec.crop_offset == "round":
        return F.center_crop(img, list(spec.crop_size))
    ch, cw = spec.crop_size
    h, w = int(img.shape[-2]), int(img.shape[-1])
    if ch > h or cw > w:  # pad only, as torchvision splits it (no cropping at this size)
        img = F.center_crop(img, [max(ch, h), max(cw, w)])
        h, w = int(img.shape[-2]), int(img.shape[-1])
    top, left = _crop_start(h, ch, "floor"), _crop_start(w, cw, "floor")
    return img[..., top : top + ch, left : left + cw]


def preprocess(image: torch.Tensor, spec: Preprocessing, native: bool = False) -> torch.Tensor:
    """uint8 [3, H, W] -> float32 [3, crop_h, crop_w], normalised.

    With resize_kernel "float", the same result as torchvision's ImageClassification preset
    applied to the uint8 tensor; with "uint8", within one uint8 level of it before scaling.
    The input may be a channels-last view (as torchvision's decoders return); the output is
    contiguous.
    `native`: no resize and no crop (normalise only), for features at the image's resolution.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"preprocess expects a uint8 [3, H, W] tensor, got {image.dtype} {list(image.shape)}"
        )
    h, w = int(image.shape[1]), int(image.shape[2])
    if h == 0 or w == 0:
        raise InvalidImage(f"image is empty ({w}x{h})")
    img = image
    if native:
        return _to_input(img, spec)
    resize = F2.resize_image if spec.resize_kernel == "uint8" else F.resize
    if spec.resize_size is not None and spec.resize_mode == "squash":
        img = resize(
            img,
            list(spec.squash_size()),
            interpolation=_INTERPOLATIONS[spec.interpolation],
            antialias=spec.antialias,
        )
    elif spec.resize_size is not None:
        out_hw = _resized_size(h, w, spec.resize_size)
        long_idx = 0 if out_hw[0] > out_hw[1] else 1
        if (
            out_hw[0] * out_hw[1] > _MAX_RESIZED_PIXELS
            and out_hw[long_idx] > spec.crop_size[long_idx]
        ):
            img = _resize_center_strip(img, out_hw, spec)
        else:
            img = resize(
                img,
                [spec.resize_size],
                interpolation=_INTERPOLATIONS[spec.interpolation],
                antialias=spec.antialias,
            )
    return _to_input(_center_crop(img, spec), spec)


def _to_input(img: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """uint8 [3, H, W] (any memory layout) -> normalised float32 [3, H, W], contiguous.

    "float": torchvision's convert_image_dtype + normalize, ((x / 255) - mean) / std, for
    bit-exact agreement with weights.transforms(). "uint8": the same affine map in one fused
    pass, x * (1 / (255 std)) - mean / std, written straight into a contiguous tensor (three
    passes over the crop instead of six; equal to float32 rounding)."""
    if spec.resize_kernel == "float":
        out = F.normalize(F.convert_image_dtype(img, torch.float), list(spec.mean), list(spec.std))
        return out.contiguous()
    scale = torch.tensor([1.0 / (255.0 * s) for s in spec.std], device=img.device)
    shift = torch.tensor(
        [m / s for m, s in zip(spec.mean, spec.std, strict=True)], device=img.device
    )
    out = torch.empty(img.shape, dtype=torch.float32, device=img.device)
    out.copy_(img)
    return out.mul_(scale.view(3, 1, 1)).sub_(shift.view(3, 1, 1))
