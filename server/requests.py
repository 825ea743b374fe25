"""Protobuf requests -> validated domain objects, with every bound a request must respect. Each
check runs before any compute and says what to change; the order of the checks is the order in
which a client hears about its mistakes. Torch-free: unit-tested without a server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from layertap.common.options import FLOAT_DTYPES, PRIORITY_NAMES
from layertap.v1 import layertap_pb2 as pb

from .budgets import (
    check_encoded_sizes,
    check_roi_bins,
    estimate_fits,
)
from .errors import InvalidArgument, InvalidImage, LimitExceeded
from .output_options import descriptor_dims, output_spec
from .spec import (
    MAX_NAME_CHARS,
    Box,
    ImageInput,
    NodeSpec,
    OutputSpec,
    check_name_length,
    check_pool,
)

if TYPE_CHECKING:
    from .heads import Head
    from .settings import Settings

MAX_REGIONS = 256
MAX_REQUESTED_NODES = 10_000  # nodes + aliases of one Extract, checked before they are iterated
# All the names of one request together (Extract's nodes, alias keys and values; Compare's nodes;
# GetParameters' names), each also at most MAX_NAME_CHARS: every node of the largest catalogue
# (a few thousand names of < 100 characters) fits, and the event loop's work on names stays small.
MAX_NAMES_CHARS = 1 << 18
MAX_PARAMETER_NAMES = 10_000  # names of one GetParameters, checked before they are iterated
MAX_TENSOR_DIMS = 4  # a raw image is [H, W, 3] or [1, 3, H, W] / [3, H, W]
NODE_HINT = "node names are dotted paths such as 'layer4.1.relu' (see DescribeModel)"
# Nodes one Compare may name (resolved on the event loop; a message could carry millions).
MAX_COMPARE_NODES = 128
DEFAULT_CONCAT_KEY = "descriptor"
# VGG16's relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (Johnson et al.; LPIPS's VGG taps).
VGG16_NODES = ("features.3", "features.8", "features.15", "features.22", "features.29")
DEFAULT_COMPARE_NODES = {"vgg16": VGG16_NODES}
MAP_LAYOUTS = ("NCHW", "NHWC", "NLC")


class Catalogue(Protocol):
    """What validation reads of a model's node catalogue (server/catalog.py)."""

    def prefix_tokens(self, name: str, n_prefix: int) -> int: ...


class Model(Protocol):
    """What validation reads of a loaded model (server/loaded.py's LoadedModel)."""

    @property
    def config(self) -> Any: ...
    @property
    def catalog(self) -> Catalogue: ...
    @property
    def n_prefix_tokens(self) -> int: ...


class Models(Protocol):
    """The model runtime as validation sees it: lookup (NOT_FOUND / UNAVAILABLE) and resolving
    requested names to catalogue nodes (INVALID_ARGUMENT with the closest names)."""

    def model(self, name: str) -> Model: ...
    def resolve(self, name: str, requested: Sequence[str]) -> list[NodeSpec]: ...


@dataclass(frozen=True)
class ExtractJob:
    """One Extract request, validated: what to run, on which images, and how to name answers."""

    model: str
    plan: list[tuple[str, str]]  # (output key, requested name), request order
    specs: list[NodeSpec]  # the resolved node of each plan entry
    nodes: tuple[str, ...]  # distinct resolved names: the worker's node set
    spec: OutputSpec
    concat_key: str  # "" unless concat
    inputs: list[ImageInput]
    regions: list[list[Box]]
    native: bool
    priority: int
    bypass_result_cache: bool = False  # neither read nor store the result cache


def check_names(names: Sequence[str], what: str, hint: str, total: int = 0) -> int:
    """Each name at most MAX_NAME_CHARS and all of them (with `total` counted before) at most
    MAX_NAMES_CHARS, checked before any name is hashed, resolved or quoted; returns the total."""
    for index, name in enumerate(names):
        check_name_length(name, f"{what}[{index}]", hint)
        total += len(name)
        if total > MAX_NAMES_CHARS:
            raise InvalidArgument(
                f"the names of this request reach {total} characters at {what}[{index}], more "
                f"than the {MAX_NAMES_CHARS} one request may carry; {hint}"
            )
    return total


def plan_outputs(
    nodes: Sequence[str], aliases: Mapping[str, str] | Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """(output key, requested name) in request order; aliased nodes not in `nodes` come last.
    `aliases`: a mapping or its (node, key) pairs. Counts and name lengths are checked before
    any name is hashed."""
    if len(nodes) + len(aliases) > MAX_REQUESTED_NODES:
        raise InvalidArgument(
            f"{len(nodes)} nodes and {len(aliases)} aliases, more than {MAX_REQUESTED_NODES} "
            "names in one request; no model has that many nodes (see DescribeModel)"
        )
    pairs = list(aliases.items()) if isinstance(aliases, Mapping) else list(aliases)
    total = check_names(nodes, "nodes", NODE_HINT)
    total = check_names([n for n, _ in pairs], "aliases (node)", NODE_HINT, total)
    check_names([k for _, k in pairs], "aliases (key)", "an alias is an output key", total)
    key_of = dict(pairs)
    listed = set(nodes)  # once: in the comprehension it was rebuilt per alias (quadratic)
    requested = list(nodes) + sorted(n for n in key_of if n not in listed)
    if not requested:
        raise InvalidArgument("no nodes requested; name at least one (see DescribeModel)")
    plan: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for name in requested:
        if not name:
            raise InvalidArgument("empty node name in nodes")
        key = key_of.get(name, name)
        if not key:
            raise InvalidArgument(f"alias for node {name!r} is empty")
        if key in seen:
            if seen[key] == name:
                continue  # the same node twice: return it once
            raise InvalidArgument(f"output key {key!r} is used for both {seen[key]!r} and {name!r}")
        seen[key] = name
        plan.append((key, name))
    return plan


def extract_job(
    request: pb.ExtractRequest, settings: Settings, models: Models, heads: Mapping[str, Head]
) -> ExtractJob:
    """Every check of an Extract that needs no pixels, cheapest and most basic first."""
    s = settings
    loaded = models.model(request.model)  # NOT_FOUND / UNAVAILABLE first
    count = len(request.images)
    if count == 0:
        raise InvalidArgument("no images in the request; send at least one")
    if count > s.max_images_per_request:
        raise LimitExceeded(
            f"{count} images in one request exceed max_images_per_request="
            f"{s.max_images_per_request}; split the request"
        )
    if len(request.nodes) + len(request.aliases) > MAX_REQUESTED_NODES:  # before copying
        plan_outputs(request.nodes, request.aliases)  # raises with the counts
    # copied, not hashed: plan_outputs bounds every name first
    plan = plan_outputs(list(request.nodes), list(request.aliases.items()))
    specs = models.resolve(request.model, [name for _, name in plan])
    spec = output_spec(request.output, heads, request.model)
    for node in specs:
        check_pool(spec.pool, node.layout, node.name)
        if (
            spec.pool in ("cls", "cls_mean")
            and loaded.catalog.prefix_tokens(node.name, loaded.n_prefix_tokens) == 0
        ):
            where = (
                f"model {request.model!r} has no CLS token"
                if loaded.n_prefix_tokens == 0
                else f"node {node.name!r} comes before the CLS token is prepended"
            )
            raise InvalidArgument(f"{where}; use pool 'mean' (or a later token node)")
    first = {n.name: n for n in reversed(specs)}  # each node's first spec
    full_nodes = tuple(dict.fromkeys(n.name for n in specs))
    unique_specs = [first[name] for name in full_nodes]
    concat_key = ""
    if spec.concat:
        concat_key = request.output.concat_key or DEFAULT_CONCAT_KEY
    dims = descriptor_dims(unique_specs, spec, heads)

    inputs = [image_input(img, i) for i, img in enumerate(request.images)]
    regions = [regions_of(img, i) for i, img in enumerate(request.images)]
    if any(regions):
        for node in unique_specs:
            if node.layout not in ("NCHW", "NHWC"):
                raise InvalidArgument(
                    f"regions need feature-map nodes (layout NCHW or NHWC); node "
                    f"{node.name!r} is {node.layout or 'of unknown layout'}"
                )
    check_encoded_sizes(inputs, s.max_image_bytes)
    estimate_fits(unique_specs, spec, dims, [len(r) for r in regions], s)
    if any(regions):  # after the size check: for raw regions the message limit says more
        check_roi_bins(unique_specs, spec.roi_size, regions)
    priority = request.priority
    if priority not in PRIORITY_NAMES:
        raise InvalidArgument(
            f"unknown priority {priority}; use PRIORITY_NORMAL (0) or PRIORITY_LOW (1)"
        )
    n_views = len(spec.scales) * (2 if spec.flip else 1)
    if n_views > 1 and count * n_views > s.max_queue_images:  # the batcher would say "images"
        raise LimitExceeded(
            f"{count} images x {n_views} TTA views are {count * n_views} forward inputs, "
            f"more than the whole batch queue (max_queue_images={s.max_queue_images}); send "
            f"at most {max(1, s.max_queue_images // n_views)} images per request with this tta"
        )
    return ExtractJob(
        request.model,
        plan,
        specs,
        full_nodes,
        spec,
        concat_key,
        inputs,
        regions,
        request.native_resolution,
        int(priority),
        request.bypass_result_cache,
    )


def parameter_request(request: pb.GetParametersRequest) -> tuple[list[str], str]:
    """(names, dtype) of a GetParameters request, each name non-empty and bounded, the dtype
    served."""
    if len(request.names) > MAX_PARAMETER_NAMES:  # before copying them
        raise InvalidArgument(
            f"{len(request.names)} names, more than {MAX_PARAMETER_NAMES} in one request; a "
            "module path ('features.0') returns all of its parameters at once"
        )
    names = list(request.names)
    check_names(names, "names", "parameter names are dotted paths such as 'features.0.weight'")
    if not names:
        raise InvalidArgument(
            "no names; list parameter names ('features.0.weight') or module paths "
            "('features.0'; see DescribeModel's modules)"
        )
    for index, name in enumerate(names):
        if not name:
            raise InvalidArgument(
                f"names[{index}] is empty; the root module is not allowed, name a "
                "parameter or a module path (see DescribeModel's modules)"
            )
    dtype = request.dtype or "float32"
    if dtype not in FLOAT_DTYPES:
        raise InvalidArgument(
            f"dtype {dtype[:40]!r} is not supported; use {', '.join(FLOAT_DTYPES)}"
        )
    return names, dtype


def regions_of(image: pb.Image, index: int) -> list[Box]:
    """An image's region boxes, checked for shape here (bounds need the decoded size)."""
    if len(image.regions) > MAX_REGIONS:
        raise InvalidArgument(
            f"image {index}: {len(image.regions)} regions, more than {MAX_REGIONS} per image; "
            "split them over several requests"
        )
    boxes: list[Box] = []
    for j, r in enumerate(image.regions):
        box = (float(r.x1), float(r.y1), float(r.x2), float(r.y2))
        if not all(math.isfinite(v) for v in box) or not (box[0] < box[2] and box[1] < box[3]):
            raise InvalidArgument(
                f"image {index}: regions[{j}] = ({box[0]:g}, {box[1]:g}, {box[2]:g}, "
                f"{box[3]:g}) is not a box; need finite x1 < x2 and y1 < y2 in pixels of the "
                "image as sent"
            )
        boxes.append(box)
    return boxes


def _source(image: pb.Image) -> ImageInput | None:
    """The image as sent (None: neither source set), for Extract's and Compare's checks; a raw
    tensor's dtype and rank are bounded before they are copied (InvalidImage)."""
    which = image.WhichOneof("source")
    if which == "encoded":
        return ImageInput(encoded=image.encoded)
    if which == "tensor":
        t = image.tensor
        if len(t.shape) > MAX_TENSOR_DIMS:
            raise InvalidImage(
                f"tensor.shape has {len(t.shape)} dimensions; a raw image is uint8 [H, W, 3] "
                "or float32 [1, 3, H, W] / [3, H, W]"
            )
        if len(t.dtype) > MAX_NAME_CHARS:
            raise InvalidImage(
                f"tensor.dtype is {len(t.dtype)} characters long; use 'uint8' or 'float32'"
            )
        return ImageInput(dtype=t.dtype, shape=tuple(t.shape), data=t.data)
    return None


def image_input(image: pb.Image, index: int) -> ImageInput:
    """An Extract image as sent: encoded bytes or a raw tensor (decoded later, in the pool)."""
    try:
        given = _source(image)
    except InvalidImage as exc:
        raise exc.at(index) from None
    if given is None:
        raise InvalidImage("neither 'encoded' bytes nor a 'tensor' is set", index)
    return given


# --------------------------------------------------------------------------- Compare


def compare_pairs(settings: Settings, request: pb.CompareRequest) -> int:
    """Pairs in the request; refuses unequal sides, no pairs, or too many images."""
    pairs = len(request.a)
    if pairs != len(request.b):
        raise InvalidArgument(
            f"a has {pairs} images and b has {len(request.b)}; Compare takes pairs "
            "(a[i], b[i]): send lists of the same length"
        )
    if pairs == 0:
        raise InvalidArgument("no pairs in the request; send at least one image in a and in b")
    limit = settings.max_images_per_request
    if 2 * pairs > limit:
        raise LimitExceeded(
            f"{pairs} pairs are {2 * pairs} images, over max_images_per_request={limit} "
            f"(both sides count); send at most {limit // 2} pairs per request"
        )
    return pairs


def pair_image_input(image: pb.Image, side: str, index: int) -> ImageInput:
    """A Compare image: whole images only (no regions); errors name the side and position."""
    if image.regions:
        raise InvalidImage(
            f"{side}[{index}]: has {len(image.regions)} regions, but Compare compares whole "
            "images; crop the regions client-side and send them as pairs, or leave regions empty"
        )
    try:
        given = _source(image)
    except InvalidImage as exc:
        raise InvalidImage(f"{side}[{index}]: {exc.reason}") from None
    if given is None:
        raise InvalidImage(f"{side}[{index}]: neither 'encoded' bytes nor a 'tensor' is set")
    return given


def compare_nodes(models: Models, request: pb.CompareRequest) -> tuple[list[str], list[NodeSpec]]:
    """(names, resolved nodes): the requested nodes, else the model's compare_nodes, else its
    architecture's default; each must be a feature map (or tokens), each once."""
    loaded = models.model(request.model)
    cfg = loaded.config
    if len(request.nodes) > MAX_COMPARE_NODES:  # before copying them
        raise InvalidArgument(
            f"{len(request.nodes)} nodes, more than {MAX_COMPARE_NODES}; compare on a few "
            "layers (LPIPS uses 5)"
        )
    names = list(request.nodes)
    check_names(names, "nodes", NODE_HINT)
    where = ""
    if not names:
        names = list(cfg.compare_nodes)
        where = f"model {request.model!r}'s compare_nodes config: "
    if not names and not cfg.submodule:
        names = list(DEFAULT_COMPARE_NODES.get(cfg.arch or "", ()))
    if not names:
        raise InvalidArgument(
            f"model {request.model!r} has no default compare nodes (only vgg16 does, or a "
            "model's compare_nodes config); name feature-map nodes in nodes, e.g. "
            "['features.3', 'features.6'] (see DescribeModel)"
        )
    if len(names) > MAX_COMPARE_NODES:
        raise InvalidArgument(
            f"{where}{len(names)} nodes, more than {MAX_COMPARE_NODES}; compare on a few layers "
            "(LPIPS uses 5)"
        )
    given: dict[str, int] = {}
    for index, name in enumerate(names):
        if not name:
            raise InvalidArgument(f"{where}nodes[{index}] is empty; name a feature-map node")
        if name in given:  # before resolving: cheap, and the message points at the repeat
            raise InvalidArgument(
                f"{where}nodes[{given[name]}] and nodes[{index}] are both {name[:80]!r}; list "
                "each node once"
            )
        given[name] = index
    try:
        specs = models.resolve(request.model, names)
    except InvalidArgument as exc:
        raise InvalidArgument(where + str(exc)) from None
    seen: dict[str, str] = {}
    for name, node in zip(names, specs, strict=True):
        if node.name in seen:
            raise InvalidArgument(
                f"{where}nodes {seen[node.name]!r} and {name!r} are the same node "
                f"{node.name!r}; list each node once"
            )
        seen[node.name] = name
        if node.layout not in MAP_LAYOUTS:
            raise InvalidArgument(
                f"{where}node {name!r} ({node.name}) has layout {node.layout or 'unknown'} "
                f"(shape {list(node.shape)}); Compare needs feature maps (NCHW, NHWC) or "
                "tokens (NLC): pick a convolutional or block output (see DescribeModel)"
            )
    return names, specs
