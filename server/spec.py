"""What a validated request asks of each activation: the OutputSpec and its PostOps, the other
domain objects a request is made of (ImageInput, Box, NodeSpec), and the rules between them that
need no tensor. Torch-free, so request validation and the transport import it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layertap.common.options import (
    HEAD_OPS,
    MAP_ONLY_POOLS,
    OUTPUT_DTYPES,
    SPATIAL_POOLS,
    TOKEN_POOLS,
    UNIT_POST_OPS,
)
from layertap.common.options import POST_OP_NAMES as _POST_OP_NAMES

from .errors import ImageLimitExceeded, InvalidArgument

if TYPE_CHECKING:
    from .heads import Head

POST_OPS = tuple(_POST_OP_NAMES.values())
# Longest model, node, alias, head or parameter name a request may carry, checked before the
# name is hashed, compared or quoted: the longest served names are ~70 characters (torchvision,
# timm and Hugging Face catalogues), and a 64 MiB message could hold one of 60 million.
MAX_NAME_CHARS = 512
ROI_POOLS = SPATIAL_POOLS  # every spatial pool also pools roi_align bins
Box = tuple[float, float, float, float]
"""A region of an image as sent: (x1, y1, x2, y2) in its pixels."""


@dataclass(frozen=True)
class ImageInput:
    """One image as the client sent it: encoded bytes, or a raw tensor (dtype + shape + bytes)."""

    encoded: bytes | None = None
    dtype: str = ""
    shape: tuple[int, ...] = ()
    data: bytes = b""


@dataclass(frozen=True)
class DecodeLimits:
    """Per-image limits, checked before any pixel is decoded.

    max_pixels guards memory: a 40 MP RGB image is 120 MB as uint8. Pillow's own bomb guard
    (``Image.MAX_IMAGE_PIXELS``, ~89 MP; error above twice that) is bypassed for header probes, so
    this is the limit that counts; images above Pillow's hard limit are still refused by the Pillow
    decoders (GIF/BMP/WebP), reported as ImageLimitExceeded.
    """

    max_encoded_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_encoded_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError(f"DecodeLimits must be positive, got {self}")


def check_name_length(name: str, what: str, hint: str) -> None:
    """Refuse (INVALID_ARGUMENT) a name over MAX_NAME_CHARS, quoting only its start."""
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(
            f"{what} ({name[:40]!r}...) is {len(name)} characters long, more than the "
            f"{MAX_NAME_CHARS} a name may have; {hint}"
        )


def check_encoded_size(size: int, limits: DecodeLimits) -> None:
    """The encoded-bytes limit; cheap, so callers may apply it before any other work."""
    if size > limits.max_encoded_bytes:
        raise ImageLimitExceeded(
            f"{size} encoded bytes exceed max_image_bytes={limits.max_encoded_bytes}"
        )


@dataclass(frozen=True)
class NodeSpec:
    """One extractable node: a batch-dependent tensor of the eval graph."""

    name: str
    shape: tuple[int, ...]  # for one image at the model's input size (leading dim 1)
    dtype: str
    layout: str  # NCHW | NHWC | NLC | NC | ""
    op: str
    target: str

    @property
    def channels(self) -> int | None:
        """C, from the catalogue's shape (None when unknown)."""
        channel_dim = {"NHWC": 3, "NLC": 2}.get(self.layout, 1)
        return int(self.shape[channel_dim]) if len(self.shape) > channel_dim else None


@dataclass(frozen=True)
class PostOp:
    """One post-processing step (docs/DESCRIPTORS.md, "Post steps")."""

    op: str  # "l2" | "power" | "center" | "pca" | "whiten"
    alpha: float = 0.5  # power exponent, 0 < alpha <= 1
    head: str = ""  # center / pca / whiten: a head name from the config
    dim: int = 0  # pca / whiten: leading components kept (0 = all of the head's)


@dataclass(frozen=True)
class OutputSpec:
    """What a request wants done to each activation after the forward (hashable: the worker
    groups items by it)."""

    pool: str = "raw"  # raw | SPATIAL_POOLS | TOKEN_POOLS
    gem_p: float = 3.0
    normalize: bool = False
    dtype: str = "float32"  # a DTYPES name or "int8"
    post: tuple[PostOp, ...] = ()
    concat: bool = False
    rmac_levels: int = 3
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    roi_size: int = 7


# --------------------------------------------------------------------------- checks


def check_pool(pool: str, layout: str, node: str) -> None:
    """Refuse a pooling that the node's layout cannot support (before any compute)."""
    if pool == "raw":
        return
    if pool not in SPATIAL_POOLS and pool not in TOKEN_POOLS:
        raise InvalidArgument(
            f"unknown pool {pool!r}; use raw, {', '.join(SPATIAL_POOLS + TOKEN_POOLS)}"
        )
    if pool in TOKEN_POOLS and layout != "NLC":
        raise InvalidArgument(
            f"pool '{pool}' needs a token output (layout NLC); node {node!r} is "
            f"{layout or 'unknown'}; use avg, max, gem, avgmax or catavgmax for feature maps"
        )
    if pool in MAP_ONLY_POOLS and layout not in ("NCHW", "NHWC"):
        raise InvalidArgument(
            f"pool '{pool}' needs a spatial feature map (layout NCHW or NHWC); node {node!r} is "
            f"{layout or 'unknown'}; use gem or max"
            + (", or cls, mean or cls_mean for tokens" if layout == "NLC" else "")
        )
    if pool in SPATIAL_POOLS and layout not in ("NCHW", "NHWC", "NLC", "NC"):
        raise InvalidArgument(
            f"pool '{pool}' cannot pool node {node!r}: its layout is unknown; request raw output"
        )


def is_unit_output(spec: OutputSpec) -> bool:
    """Whether finish() leaves every vector L2-normalised (the int8 precondition): `normalize`,
    or a post chain ending in l2 / power / pca / whiten, or concat with no post chain after it
    (a trailing `center` undoes the unit length of a concat)."""
    if spec.normalize:
        return True
    if spec.post:
        return spec.post[-1].op in UNIT_POST_OPS
    return spec.concat


def check_output(spec: OutputSpec, heads: Mapping[str, Head]) -> None:
    """Validate the spec's pooling-independent parts before compute: post ops, heads, dims,
    alpha, levels, dtype and the int8 rule (finish() repeats it; this runs before the forward)."""
    if spec.dtype not in OUTPUT_DTYPES:
        raise InvalidArgument(
            f"output dtype {spec.dtype!r} is not supported; use {', '.join(OUTPUT_DTYPES)}"
        )
    if spec.dtype == "int8":
        if spec.pool == "raw":
            raise InvalidArgument(
                "dtype int8 is for pooled, L2-normalised descriptors; raw maps use float32, "
                "float16 or bfloat16"
            )
        if not is_unit_output(spec):
            raise InvalidArgument(
                "dtype int8 needs L2-normalised descriptors: set normalize, use concat, or end "
                "the post chain with l2, power, pca or whiten"
            )
    if not (math.isfinite(spec.gem_p) and spec.gem_p > 0):
        raise InvalidArgument(f"gem_p must be a finite number > 0, got {spec.gem_p}")
    if spec.pool in MAP_ONLY_POOLS and spec.rmac_levels < 1:
        raise InvalidArgument(f"rmac_levels must be >= 1, got {spec.rmac_levels}")
    if spec.roi_size < 1:
        raise InvalidArgument(f"roi_size must be >= 1, got {spec.roi_size}")
    for i, step in enumerate(spec.post):
        where = f"post step {i} ({step.op})"
        if step.op not in POST_OPS:
            raise InvalidArgument(
                f"post step {i}: unknown op {step.op!r}; use {', '.join(POST_OPS)}"
            )
        if step.op == "power" and not (math.isfinite(step.alpha) and 0 < step.alpha <= 1):
            raise InvalidArgument(f"{where}: alpha must be in (0, 1], got {step.alpha}")
        if step.op in HEAD_OPS:
            head = head_for(step, heads, where)
            if step.dim < 0:
                raise InvalidArgument(f"{where}: dim must be >= 0 (0 = all), got {step.dim}")
            if step.dim > head.n_components:
                raise InvalidArgument(
                    f"{where}: dim {step.dim} is more than head {step.head!r}'s "
                    f"{head.n_components} components"
                )


def head_for(step: PostOp, heads: Mapping[str, Head], where: str) -> Head:
    """The registered head a step names; INVALID_ARGUMENT naming the known ones otherwise."""
    if not step.head:
        raise InvalidArgument(f"{where} needs a head name")
    head = heads.get(step.head)
    if head is None:
        known = ", ".join(sorted(heads)) or "none are configured"
        raise InvalidArgument(f"{where}: unknown head {step.head!r}; known heads: {known}")
    return head


def pooled_dim(pool: str, channels: int) -> int:
    """Descriptor size of one pooled vector: 2C for catavgmax / cls_mean, else C."""
    return 2 * channels if pool in ("catavgmax", "cls_mean") else channels
