"""Protocol requests from validated options: the extract request template (no images), the
same with images attached, the parameters request, and the split of an extract call's images
into requests within the server's advertised limits (images per request, message bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from layertap.common.option_parsing import (
    NodesArg,
    RegionsArg,
    build_output_options,
    normalize_nodes,
    parse_priority,
    parse_regions,
)
from layertap.common.options import OUTPUT_OPTION_NAMES, REQUEST_OPTION_NAMES
from layertap.v1 import layertap_pb2 as pb

from ._images import ImageLike, images_to_proto
from ._options import PARAMETER_DTYPES
from .errors import FeatureServiceError
from .types import ServerInfo


def attach_regions(images: Sequence[pb.Image], regions: RegionsArg) -> None:
    """Put each image's boxes on its Image message, so any split into several requests keeps
    the regions with their image."""
    parsed = parse_regions(regions, len(images))
    if parsed is None:
        return
    for image, boxes in zip(images, parsed, strict=True):
        del image.regions[:]
        image.regions.extend(boxes)


def build_request_template(
    *,
    model: str,
    nodes: NodesArg,
    priority: str = "normal",
    native_resolution: bool = False,
    bypass_result_cache: bool = False,
    **output: Any,
) -> pb.ExtractRequest:
    """Validate every option client-side and build an ExtractRequest without images.
    ``output``: the keywords of :func:`build_output_options` (pool, gem_p, normalize, dtype,
    post, concat, concat_key, tta, rmac_levels, roi_size)."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty model name (see list_models())")
    names, aliases = normalize_nodes(nodes)
    options = build_output_options(**output)
    if not isinstance(native_resolution, bool):
        raise TypeError(f"native_resolution must be a bool, got {native_resolution!r}")
    if not isinstance(bypass_result_cache, bool):
        raise TypeError(f"bypass_result_cache must be a bool, got {bypass_result_cache!r}")
    return pb.ExtractRequest(
        model=model,
        nodes=names,
        aliases=aliases,
        output=options,
        priority=parse_priority(priority),
        native_resolution=native_resolution,
        bypass_result_cache=bypass_result_cache,
    )


EXTRACT_OPTIONS = ("model", "nodes", *REQUEST_OPTION_NAMES, *OUTPUT_OPTION_NAMES)
"""The keyword arguments of ``extract`` and ``extract_many`` (both clients) that go into the
request: all but the images, their regions, the timeout and extract_many's run options."""


def request_template(arguments: Mapping[str, Any]) -> pb.ExtractRequest:
    """The validated ExtractRequest (no images) for a call of ``extract`` or ``extract_many``
    of either client, from that call's arguments (its ``locals()``, of which the
    :data:`EXTRACT_OPTIONS` are read): the one place their options become a request."""
    return build_request_template(**{name: arguments[name] for name in EXTRACT_OPTIONS})


def with_images(template: pb.ExtractRequest, images: Sequence[pb.Image]) -> pb.ExtractRequest:
    """A copy of ``template`` carrying ``images``."""
    request = pb.ExtractRequest()
    request.CopyFrom(template)
    request.images.extend(images)
    return request


def build_extract_request(
    images: ImageLike | Sequence[ImageLike], *, regions: RegionsArg = None, **options: Any
) -> tuple[pb.ExtractRequest, int]:
    """Validate everything client-side and build the request; returns it and the image count.
    ``options``: the keywords of :func:`build_request_template`."""
    template = build_request_template(**options)
    proto_images = images_to_proto(images)
    attach_regions(proto_images, regions)
    return with_images(template, proto_images), len(proto_images)


def parameters_request(
    model: str, names: str | Sequence[str], dtype: str
) -> pb.GetParametersRequest:
    """A validated GetParametersRequest."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty model name (see list_models())")
    name_list = [names] if isinstance(names, str) else list(names)
    if not name_list or not all(isinstance(n, str) and n for n in name_list):
        raise ValueError(
            f"names must be a parameter name, a module path or a non-empty list of them, "
            f"got {names!r}"
        )
    if dtype not in PARAMETER_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(PARAMETER_DTYPES)}")
    return pb.GetParametersRequest(model=model, names=name_list, dtype=dtype)


# --------------------------------------------------------------------------- request sizing

REQUEST_HEADROOM_BYTES = 64 * 1024
"""Kept free under the message limit: gRPC framing, and slack for fields we do not count."""
_PER_IMAGE_OVERHEAD = 16  # field tag + length prefixes of one repeated Image entry


def image_wire_bytes(image: pb.Image) -> int:
    """Bytes one image adds to an ExtractRequest."""
    return image.ByteSize() + _PER_IMAGE_OVERHEAD


def image_budget(template: pb.ExtractRequest, info: ServerInfo | None, client_max: int) -> int:
    """Bytes of images one request may carry: the smaller of the server's and this client's
    message limits, less the request's own fields and headroom."""
    limits = [client_max]
    if info is not None and info.max_message_bytes > 0:
        limits.append(info.max_message_bytes)
    limit = min(limits)
    headroom = min(REQUEST_HEADROOM_BYTES, limit // 16)
    return max(1, limit - template.ByteSize() - headroom)


def images_per_request(info: ServerInfo | None, wanted: int | None = None) -> int:
    """Images one request may carry: ``wanted`` capped by the server's limit (0: unknown)."""
    cap = info.max_images_per_request if info is not None else 0
    if wanted is None:
        return cap if cap > 0 else 1 << 30
    return min(wanted, cap) if cap > 0 else wanted


def check_image(image: pb.Image, info: ServerInfo | None, budget: int, what: str) -> None:
    """Refuse locally (RESOURCE_EXHAUSTED, as the server would) an image that cannot be sent:
    encoded bytes over the server's ``max_image_bytes``, or alone over the message budget."""
    if (
        info is not None
        and info.max_image_bytes > 0
        and image.WhichOneof("source") == "encoded"
        and len(image.encoded) > info.max_image_bytes
    ):
        raise FeatureServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{what} is {len(image.encoded)} encoded bytes, over the server's max_image_bytes "
            f"({info.max_image_bytes}); not sent",
        )
    size = image_wire_bytes(image)
    if size > budget:
        raise FeatureServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{what} takes {size} bytes in a request, over what one message may carry "
            f"({budget} bytes under max_message_bytes); not sent",
        )


def plan_requests(
    template: pb.ExtractRequest,
    images: Sequence[pb.Image],
    info: ServerInfo | None,
    client_max: int,
) -> list[pb.ExtractRequest]:
    """The Extract requests that carry ``images`` within the server's limits (one unless
    there are more images than ``max_images_per_request`` or bytes than one message takes).
    Raises RESOURCE_EXHAUSTED, before sending anything, for an image that cannot be sent."""
    budget = image_budget(template, info, client_max)
    for i, image in enumerate(images):
        check_image(image, info, budget, f"image {i}" if len(images) > 1 else "the image")
    sizes = [image_wire_bytes(image) for image in images]
    return [
        with_images(template, images[r.start : r.stop])
        for r in plan_chunks(sizes, images_per_request(info), budget)
    ]


def plan_chunks(sizes: Sequence[int], max_images: int, budget: int) -> list[range]:
    """Split images (their wire sizes, in order) into consecutive requests of at most
    ``max_images`` images and ``budget`` bytes each; every image fits alone (checked first)."""
    chunks: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_images or total + size > budget):
            chunks.append(range(start, i))
            start, total = i, 0
        total += size
    if sizes:
        chunks.append(range(start, len(sizes)))
    return chunks
