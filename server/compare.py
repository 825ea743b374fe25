"""The Compare RPC: per-pair perceptual (LPIPS-style) and Gram-matrix style distances.

Images take Extract's path (decode pool → batcher with raw outputs → worker), so they batch
with other traffic; the maps never leave the server. The distance math is in pure functions
(`layer_distance`, `gram`, `style_distance`) run in the decode pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from layertap.v1 import layertap_pb2 as pb

from .batcher import BatchInfo
from .catalog import NodeSpec
from .errors import InvalidArgument, InvalidImage, LimitExceeded, PerImageError
from .pooling import OutputSpec
from .prepare import ImageInput, Prepared

if TYPE_CHECKING:
    from .service import FeatureService

# VGG16's relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (Johnson et al.; LPIPS's VGG taps).
VGG16_NODES = ("features.3", "features.8", "features.15", "features.22", "features.29")
DEFAULT_NODES = {"vgg16": VGG16_NODES}
# LPIPS's normalisation epsilon: x / (||x|| + eps) over channels at each position.
EPS = 1e-10
# The pair math runs in float64 on slices of this many map elements (32 MiB), not whole maps.
CHUNK_ELEMENTS = 1 << 22
MAP_LAYOUTS = ("NCHW", "NHWC", "NLC")
# Nodes one Compare may name (resolved on the event loop; a message could carry millions).
MAX_NODES = 128
_RAW = OutputSpec(pool="raw", dtype="float32")


# --------------------------------------------------------------------------- the formulas


def positions(
    x: torch.Tensor, layout: str, n_prefix: int = 0, dtype: torch.dtype | None = torch.float64
) -> torch.Tensor:
    """One image's map ([C, H, W], [H, W, C] or [L, C] tokens) → float64 [C, P]: channels by
    positions. Tokens are positions; the leading `n_prefix` (CLS/register) tokens are not.
    `dtype` None: the map's own dtype, a view where the layout allows (no copy)."""
    if layout == "NCHW":
        f = x.reshape(x.shape[0], -1)
    elif layout == "NHWC":
        f = x.reshape(-1, x.shape[-1]).T
    elif layout == "NLC":
        tokens = x[n_prefix:] if x.shape[0] > n_prefix else x
        f = tokens.T
    else:
        raise InvalidArgument(f"cannot compare layout {layout!r}; use NCHW, NHWC or NLC nodes")
    return f if dtype is None else f.to(dtype)


def unit_channels(f: torch.Tensor) -> torch.Tensor:
    """[C, P] with each position's channel vector scaled to unit length (LPIPS)."""
    return f / (f.norm(dim=0, keepdim=True) + EPS)


def layer_distance(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """mean over positions of ||a/|a| - b/|b|||^2 (channels summed), fa and fb [C, P]."""
    diff = unit_channels(fa) - unit_channels(fb)
    return float(diff.pow(2).sum(0).mean())


def gram(f: torch.Tensor) -> torch.Tensor:
    """G = F Fᵀ / (C·P) for F the [C, P] map (P = H·W)."""
    c, p = f.shape
    return (f @ f.T) / (c * p)


def style_distance(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """||G(a) - G(b)||_F^2."""
    return float((gram(fa) - gram(fb)).pow(2).sum())


def node_terms(fa: torch.Tensor, fb: torch.Tensor, style: bool) -> tuple[float, float]:
    """(layer_distance, style_distance) of two [C, P] maps in any float dtype, computed in
    float64 over slices of positions (CHUNK_ELEMENTS each), so a native-resolution map never
    has whole float64 copies: the same values as the formulas above, in bounded memory."""
    c, p = fa.shape
    step = max(1, CHUNK_ELEMENTS // max(c, 1))
    squares = 0.0
    ga = torch.zeros((c, c), dtype=torch.float64)
    gb = torch.zeros((c, c), dtype=torch.float64)
    for start in range(0, p, step):
        a = fa[:, start : start + step].to(torch.float64)
        b = fb[:, start : start + step].to(torch.float64)
        squares += float((unit_channels(a) - unit_channels(b)).pow(2).sum())
        if style:
            ga += a @ a.T
            gb += b @ b.T
    layer = squares / p
    return layer, float(((ga - gb) / (c * p)).pow(2).sum()) if style else 0.0


@dataclass(frozen=True)
class Distances:
    layers: list[float]
    style: list[float]


def pair_distances(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    nodes: Sequence[NodeSpec],
    prefix: Mapping[str, int],
    style: bool,
) -> Distances:
    """Every node's terms for one pair (raw maps of one image each, keyed by full node name);
    `prefix`: each node's leading CLS/register tokens (Catalog.prefix_tokens), not positions."""
    layers, styles = [], []
    with torch.inference_mode():
        for node in nodes:
            fa = positions(a[node.name], node.layout, prefix[node.name], dtype=None)
            fb = positions(b[node.name], node.layout, prefix[node.name], dtype=None)
            layer, style_term = node_terms(fa, fb, style)
            layers.append(layer)
            if style:
                styles.append(style_term)
    return Distances(layers, styles)


# --------------------------------------------------------------------------- the request


def _image_input(image: pb.Image, side: str, index: int) -> ImageInput:
    if image.regions:
        raise InvalidImage(
            f"{side}[{index}]: has {len(image.regions)} regions, but Compare compares whole "
            "images; crop the regions client-side and send them as pairs, or leave regions empty"
        )
    which = image.WhichOneof("source")
    if which == "encoded":
        return ImageInput(encoded=image.encoded)
    if which == "tensor":
        t = image.tensor
        return ImageInput(dtype=t.dtype, shape=tuple(t.shape), data=t.data)
    raise InvalidImage(f"{side}[{index}]: neither 'encoded' bytes nor a 'tensor' is set")


def _per_image(exc: PerImageError, side: str, index: int) -> PerImageError:
    """The same error (and status) naming the side and position of the image."""
    return type(exc)(f"{side}[{index}]: {exc.reason}")


def compare_nodes(
    service: FeatureService, request: pb.CompareRequest
) -> tuple[list[str], list[NodeSpec]]:
    """(names, resolved nodes): the requested nodes, else the model's compare_nodes, else its
    architecture's default; each must be a feature map (or tokens), each once."""
    loaded = service.runtime.model(request.model)
    cfg = loaded.config
    names = list(request.nodes)
    where = ""
    if not names:
        names = list(cfg.compare_nodes)
        where = f"model {request.model!r}'s compare_nodes config: "
    if not names and not cfg.submodule:
        names = list(DEFAULT_NODES.get(cfg.arch or "", ()))
    if not names:
        raise InvalidArgument(
            f"model {request.model!r} has no default compare nodes (only vgg16 does, or a "
            "model's compare_nodes config); name feature-map nodes in nodes, e.g. "
            "['features.3', 'features.6'] (see DescribeModel)"
        )
    if len(names) > MAX_NODES:
        raise InvalidArgument(
            f"{where}{len(names)} nodes, more than {MAX_NODES}; compare on a few layers "
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
        specs = service.runtime.resolve(request.model, names)
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


def _check_counts(service: FeatureService, request: pb.CompareRequest) -> int:
    pairs = len(request.a)
    if pairs != len(request.b):
        raise InvalidArgument(
            f"a has {pairs} images and b has {len(request.b)}; Compare takes pairs "
            "(a[i], b[i]): send lists of the same length"
        )
    if pairs == 0:
        raise InvalidArgument("no pairs in the request; send at least one image in a and in b")
    limit = service.settings.max_images_per_request
    if 2 * pairs > limit:
        raise LimitExceeded(
            f"{pairs} pairs are {2 * pairs} images, over max_images_per_request={limit} "
            f"(both sides count); send at most {limit // 2} pairs per request"
        )
    return pairs


async def compare(service: FeatureService, request: pb.CompareRequest) -> pb.CompareResponse:
    """The whole of one Compare; failures raise LayertapError (mapped by `@rpc`)."""
    loaded = service.runtime.model(request.model)  # NOT_FOUND / UNAVAILABLE first
    pairs = _check_counts(service, request)
    names, specs = compare_nodes(service, request)
    full_nodes = loaded.catalog.in_order(n.name for n in specs)
    sides = [("a", i, img) for i, img in enumerate(request.a)]
    sides += [("b", i, img) for i, img in enumerate(request.b)]
    inputs = [_image_input(img, side, i) for side, i, img in sides]

    def label(exc: PerImageError, index: int) -> PerImageError:
        side, i, _ = sides[index]
        return _per_image(exc, side, i)

    native = request.native_resolution

    def same_sizes(images: Sequence[Prepared]) -> None:
        for i in range(pairs):
            sa, sb = images[i].tensor.shape, images[pairs + i].tensor.shape
            if sa != sb:
                fix = (
                    "with native_resolution both images of a pair must have the same "
                    "size: resize them first, or leave native_resolution off"
                    if native
                    else "send tensors of the same size for both images of a pair"
                )
                raise InvalidArgument(
                    f"pair {i}: a[{i}] is {sa[1]}x{sa[2]} and b[{i}] is {sb[1]}x{sb[2]} "
                    f"(height x width at the model input); {fix}"
                )

    service._check_encoded_sizes(inputs, label)
    # the same batch key as Extract's: compare images batch with extraction traffic
    images, rows, infos = await service._run_images(
        request.model, inputs, _RAW, full_nodes, native, label=label, check=same_sizes
    )
    loop = asyncio.get_running_loop()
    # per node: patch embeddings carry no CLS token even when the model's blocks do
    prefix = {n.name: loaded.catalog.prefix_tokens(n.name, loaded.n_prefix_tokens) for n in specs}
    math_started = time.perf_counter()
    distances: list[Distances] = await asyncio.gather(
        *(
            loop.run_in_executor(
                service.decode_pool,
                pair_distances,
                rows[i][0],
                rows[pairs + i][0],
                specs,
                prefix,
                request.style,
            )
            for i in range(pairs)
        )
    )
    _observe(service, request.model, images, infos, math_started)
    return pb.CompareResponse(
        model=request.model,
        weights_sha256=loaded.weights.sha256,
        nodes=[
            pb.ResolvedNode(key=name, requested=name, node=node.name)
            for name, node in zip(names, specs, strict=True)
        ],
        pairs=[
            pb.PairDistance(
                distance=sum(d.layers),
                layer_distances=d.layers,
                style_distance=sum(d.style),
                style_layer_distances=d.style,
            )
            for d in distances
        ],
    )


def _observe(
    service: FeatureService,
    model: str,
    images: Sequence[Prepared],
    infos: Sequence[BatchInfo],
    math_started: float,
) -> None:
    """Stage metrics like Extract's; the distance math counts as the post-compute stage."""
    m = service.metrics
    if m is None:
        return
    for info in infos:
        m.stage_seconds.labels("queue").observe(info.queue_s)
    for image in images:
        m.stage_seconds.labels("decode").observe(image.decode_s)
    for run_s in {i.batch_id: i.run_s for i in infos}.values():
        m.stage_seconds.labels("compute").observe(run_s)
    m.stage_seconds.labels("encode").observe(time.perf_counter() - math_started)
    m.images.labels(model).inc(len(images))
