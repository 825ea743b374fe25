"""What one request may cost, checked before the work is queued: encoded bytes per image, the
answer's bytes against the message limit, roi_align bins per image. Each refusal is
RESOURCE_EXHAUSTED (or the image's own error) with the figure that would fit. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import LimitExceeded, PerImageError
from .spec import Box, DecodeLimits, ImageInput, NodeSpec, OutputSpec, check_encoded_size

if TYPE_CHECKING:
    from .settings import Settings

# roi_align samples regions x channels x roi_size^2 bins per image and node before pooling; above
# this many (float32: 128 MiB) a request would hold the worker for seconds and gigabytes.
MAX_ROI_BINS = 1 << 25
# Room left in a response for everything but the tensors' bytes.
RESPONSE_HEADROOM = 64 * 1024
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
# Names a failed image in its error: (error, image index) -> the error to raise.
Label = Callable[[PerImageError, int], PerImageError]


def check_encoded_sizes(
    inputs: Sequence[ImageInput], max_bytes: int, label: Label = PerImageError.at
) -> None:
    """The cheap size check of encoded images, before any queue room is held; `label` names a
    failed image (Extract: "image i", Compare: "a[i]" / "b[i]")."""
    limits = DecodeLimits(max_encoded_bytes=max_bytes)
    for index, given in enumerate(inputs):
        if given.encoded is not None:
            try:
                check_encoded_size(len(given.encoded), limits)
            except PerImageError as exc:
                raise label(exc, index) from None


def check_roi_bins(nodes: Sequence[NodeSpec], roi_size: int, regions: Sequence[list[Box]]) -> None:
    """Refuse (RESOURCE_EXHAUSTED) region requests whose roi_align bins, per image and node,
    exceed MAX_ROI_BINS: the worker would spend seconds and gigabytes on them."""
    for node in nodes:
        channels = node.channels or 1
        for index, boxes in enumerate(regions):
            bins = len(boxes) * channels * roi_size**2
            if bins > MAX_ROI_BINS:
                fit = max(1, MAX_ROI_BINS // (channels * roi_size**2))
                raise LimitExceeded(
                    f"image {index}: {len(boxes)} regions x {channels} channels of node "
                    f"{node.name!r} x roi_size {roi_size}^2 are {bins} roi_align bins, over "
                    f"the limit of {MAX_ROI_BINS}; send at most {fit} regions per image at this "
                    "roi_size, or a smaller roi_size (0: 7)"
                )


def estimate_bytes(
    nodes: Sequence[NodeSpec],
    spec: OutputSpec,
    dims: Sequence[int | None],
    regions: Sequence[int],
) -> int:
    """Output bytes of a request at the model's input size: per image the outputs' elements
    (pooled: the descriptor dims; raw: the catalogue's shapes, or C x roi x roi per region),
    times the image's region count (1 without regions)."""
    itemsize = ITEMSIZE[spec.dtype]
    if spec.pool == "raw":
        whole = sum(math.prod(n.shape[1:]) for n in nodes)
        per_region = sum((n.channels or 1) * spec.roi_size**2 for n in nodes)
    else:
        whole = per_region = sum(d or 1 for d in dims)
    return itemsize * sum(per_region * r if r else whole for r in regions)


def estimate_fits(
    nodes: Sequence[NodeSpec],
    spec: OutputSpec,
    dims: Sequence[int | None],
    regions: Sequence[int],
    settings: Settings,
) -> None:
    """Inputs at the model's own size have known output sizes: refuse oversize answers before
    spending compute on them (raw float inputs of other sizes are checked after)."""
    estimate = estimate_bytes(nodes, spec, dims, regions)
    if estimate > settings.max_message_bytes - RESPONSE_HEADROOM:
        raise LimitExceeded(
            f"the response would carry about {estimate} bytes of tensors, over "
            f"max_message_bytes={settings.max_message_bytes}; request pooled outputs, fewer "
            "nodes, regions or images"
        )


def response_size_ok(size: int, settings: Settings) -> None:
    """Refuse an answer whose tensors would not fit the message limit (after compute: inputs of
    other sizes than the model's have output sizes known only then)."""
    if size > settings.max_message_bytes - RESPONSE_HEADROOM:
        raise LimitExceeded(
            f"the response would carry {size} bytes of tensors, over max_message_bytes="
            f"{settings.max_message_bytes}; request pooled outputs, fewer nodes or fewer images"
        )
