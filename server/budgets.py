"""What one request may cost, checked before the work is queued: encoded bytes per image, the
answer's bytes against the message limit, roi_align bins per image, and the memory it will
hold at its peak (peak_bytes; server/memory_budget.py reserves it). Each refusal is
RESOURCE_EXHAUSTED (or the image's own error) with the figure that would fit. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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


# --- memory: what a request holds at its peak (server/memory_budget.py reserves it) -----------

# A forward holds, besides the outputs asked for, the tensors still live at its widest point
# (a block's input, its output, a residual or a concat): about this many times the largest
# activation up to the deepest node. Calibrated against measured RSS by bench/memory_estimate.py.
WORKING_FACTOR = 4
FLOAT_BYTES = 4


@dataclass(frozen=True)
class ModelCost:
    """A model's memory figures from its catalogue, per image at its input size (float32)."""

    input_pixels: int
    node_bytes: Mapping[str, int]  # each node's output
    widest_upto: Mapping[str, int]  # the largest activation up to and including each node


def model_cost(input_size: tuple[int, int], nodes: Sequence[NodeSpec]) -> ModelCost:
    """ModelCost from a catalogue's nodes, in execution order."""
    node_bytes: dict[str, int] = {}
    widest: dict[str, int] = {}
    running = 0
    for node in nodes:
        size = FLOAT_BYTES * math.prod(node.shape[1:]) if node.shape else 0
        node_bytes[node.name] = size
        running = max(running, size)
        widest[node.name] = running
    return ModelCost(max(1, input_size[0] * input_size[1]), node_bytes, widest)


@dataclass(frozen=True)
class Estimate:
    """A request's estimated peak bytes, its parts, and what one image of it costs."""

    total: int
    parts: Mapping[str, int]
    per_image: int  # the costliest image: its views' held, working and answer bytes
    per_pixel: float  # of that image: bytes per input pixel (for a downscale hint)
    images: int

    def describe(self) -> str:
        return ", ".join(f"{k} {v / MIB:.0f}" for k, v in self.parts.items() if v) + " MiB"


MIB = 1 << 20


def peak_bytes(
    cost: ModelCost,
    views: Sequence[Sequence[int]],
    nodes: Sequence[str],
    keep_maps: bool,
    answer_itemsize: int,
    batch: int,
    decoded: Sequence[int] = (),
) -> Estimate:
    """The peak memory of one request. `views[i]`: the input pixels of image i's views (one
    item each); `nodes`: the full node names it asks for; `keep_maps`: raw maps are kept
    until the answer is built (raw outputs, Compare); `answer_itemsize`: bytes per element of
    raw answers (0: pooled, negligible); `batch`: the model's batch limit (activations are live
    for one batch at a time); `decoded`: uint8 bytes of images decoded at full size before
    preprocessing (native inputs), `batch` of them at once at most.

    Per view of P pixels (r = P / the model's input pixels): its float32 input 12 P, its
    requested maps r x their bytes, and the forward's working set WORKING_FACTOR x r x the
    widest activation up to the deepest node. Inputs (and kept maps) are held for the whole
    request; the working set only for the batch being run, so it counts for the `batch`
    costliest views; the answer counts twice (the tensors' bytes, then the message)."""
    maps_at_size = sum(cost.node_bytes.get(n, 0) for n in nodes)
    deepest = max((cost.widest_upto.get(n, 0) for n in nodes), default=0)
    held = working = answer = 0
    per_view_working: list[int] = []
    costliest = (0, 1)  # (bytes, pixels) of the costliest image
    for image_views in views:
        image_bytes = 0
        for index, pixels in enumerate(image_views):
            r = pixels / cost.input_pixels
            maps = int(maps_at_size * r)
            view_held = FLOAT_BYTES * 3 * pixels + (maps if keep_maps else 0)
            view_working = int(WORKING_FACTOR * deepest * r) + (0 if keep_maps else maps)
            view_answer = 2 * maps * answer_itemsize // FLOAT_BYTES if index == 0 else 0
            held += view_held
            answer += view_answer
            per_view_working.append(view_working)
            image_bytes += view_held + view_working + view_answer
        pixels = max(image_views, default=1)
        if image_bytes > costliest[0]:
            costliest = (image_bytes, max(1, pixels))
    working = sum(sorted(per_view_working, reverse=True)[: max(1, batch)])
    decode = sum(sorted(decoded, reverse=True)[: max(1, batch)])
    parts = {"inputs and kept maps": held, "forward": working, "answer": answer, "decode": decode}
    return Estimate(
        sum(parts.values()), parts, costliest[0], costliest[0] / costliest[1], len(views)
    )
