"""The Compare RPC's work: validate the pairs, run both sides' images down Extract's path (so
they batch with other traffic; the maps never leave the server), then the distance formulas
(server/distances.py) in the decode pool, never on the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from layertap.v1 import layertap_pb2 as pb

from .budgets import check_encoded_sizes
from .distances import Distances, pair_distances
from .errors import InvalidArgument, PerImageError
from .fairness import CLIENT
from .pipeline import Pipeline
from .prepare import Prepared
from .requests import compare_nodes, compare_pairs, pair_image_input
from .spec import OutputSpec

_RAW = OutputSpec(pool="raw", dtype="float32")


def _per_image(exc: PerImageError, side: str, index: int) -> PerImageError:
    """The same error (and status) naming the side and position of the image."""
    return type(exc)(f"{side}[{index}]: {exc.reason}")


async def compare(pipeline: Pipeline, request: pb.CompareRequest) -> pb.CompareResponse:
    """The whole of one Compare; failures raise LayertapError (mapped by `@rpc`)."""
    runtime = pipeline.runtime
    loaded = runtime.model(request.model)  # NOT_FOUND / UNAVAILABLE first
    pairs = compare_pairs(pipeline.settings, request)
    names, specs = compare_nodes(runtime, request)
    full_nodes = loaded.catalog.in_order(n.name for n in specs)
    sides = [("a", i, img) for i, img in enumerate(request.a)]
    sides += [("b", i, img) for i, img in enumerate(request.b)]
    inputs = [pair_image_input(img, side, i) for side, i, img in sides]

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

    check_encoded_sizes(inputs, pipeline.settings.max_image_bytes, label)
    # raw maps of every image are kept until the distances are done: all of it is reserved
    peak = await pipeline.estimate(
        request.model, inputs, _RAW, full_nodes, native, keep_maps=True, answer=False
    )
    await pipeline.admit(inputs, _RAW)  # a wait for queue room holds no memory
    with pipeline.memory.reserve(peak, CLIENT.get().key, native):
        # the same batch key as Extract's: compare images batch with extraction traffic
        ran = await pipeline.run_images(
            request.model, inputs, _RAW, full_nodes, native, label=label, check=same_sizes
        )
        rows = ran.rows
        # per node: patch embeddings carry no CLS token even when the model's blocks do
        prefix = {
            n.name: loaded.catalog.prefix_tokens(n.name, loaded.n_prefix_tokens) for n in specs
        }
        math_started = time.perf_counter()
        distances: list[Distances] = await asyncio.gather(
            *(
                pipeline.in_pool(
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
        pipeline.observe(request.model, ran, time.perf_counter() - math_started, None)
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
