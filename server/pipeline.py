"""The path every image takes, shared by Extract, ExtractStream and Compare: decode (decode
pool) → batcher → worker → finish and encode (decode pool), with the stage metrics. The event
loop only awaits here; everything proportional to pixels runs in a pool or on the worker."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from .batching import BatchInfo, BatchQueue
from .budgets import ITEMSIZE, Estimate, Label, ModelCost, model_cost, peak_bytes
from .build_budget import BuildBudget
from .errors import LimitExceeded, PerImageError, QueueFull
from .extractors import is_cached
from .fair_pool import FairPool
from .fairness import CLIENT
from .heads import Head
from .memory_budget import MemoryBudget, memory_budget
from .metrics import Metrics
from .prepare import (
    EncodedTensor,
    Prepared,
    encode_results,
    finish_results,
    input_pixels,
    prepare_image,
)
from .requests import ExtractJob
from .result_cache import ResultCache, image_keys, merge, only
from .settings import Settings, batch_limit
from .spec import Box, DecodeLimits, ImageInput, OutputSpec
from .worker import Item, ModelRuntime

# A raw answer's size is known before compute only up to the convolutions' rounding: it is
# refused early only when even this much smaller it would not fit (the exact check follows).
ESTIMATE_SLACK = 1.1
KNOWN_SETS = 8  # node sets remembered as served, per model: this many times the cache's size


def tensors_fit(size: int, max_bytes: int, estimated: bool = False) -> None:
    """The tensors' bytes alone are a lower bound of the answer's message: over the limit, refuse
    before the message is built (responses.check_message_size then checks its exact size), or,
    `estimated` from the inputs' sizes, before any compute."""
    if size > max_bytes:
        are = "would be at least" if estimated else "are"
        raise LimitExceeded(
            f"the answer's tensors alone {are} {size} bytes, over max_message_bytes={max_bytes}; "
            "request pooled outputs, fewer nodes, fewer or smaller images"
        )


@dataclass(frozen=True)
class Ran:
    """A request's images after the worker: prepared images, each image's worker outputs (one
    per view), and every item's batch info."""

    images: list[Prepared]
    rows: list[list[dict[str, Any]]]
    infos: list[BatchInfo]


@dataclass(frozen=True)
class Extracted:
    """One Extract's finished, encoded outputs (a row per image) and what it cost."""

    rows: Sequence[Mapping[str, EncodedTensor]]  # some from the result cache
    ran: Ran  # of the images computed: none when the cache held them all
    encode_s: float


class Pipeline:
    """Runs validated requests' images through the stages; one per server."""

    def __init__(
        self,
        settings: Settings,
        runtime: ModelRuntime,
        batcher: BatchQueue,
        decode_pool: Executor,
        metrics: Metrics | None = None,
        heads: Mapping[str, Head] | None = None,
        memory: MemoryBudget | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.batcher = batcher
        self.decode_pool = decode_pool
        # decode, finish and distances take turns between clients (server/fair_pool.py)
        self.pool = FairPool(decode_pool, settings.decode_threads)
        self.metrics = metrics
        self.heads: Mapping[str, Head] = dict(heads or {})  # loaded at start-up (app.load_heads)
        self.memory = memory or memory_budget(settings)  # every request reserves its peak
        self.builds = BuildBudget(settings.max_builds_per_client_per_minute)
        self.results = ResultCache(settings.result_cache_bytes, metrics)  # 0 bytes: off
        # per model, node sets served lately (KNOWN_SETS x the cache size), least recent first
        self._known: dict[str, OrderedDict[tuple[str, ...], None]] = {}
        self._costs: dict[str, ModelCost] = {}
        self.limits = DecodeLimits(
            max_encoded_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )

    async def in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the decode pool (never on the event loop), in the calling client's turn."""
        return await self.pool.run(fn, *args)

    async def run_images(
        self,
        model: str,
        inputs: Sequence[ImageInput],
        spec: OutputSpec,
        nodes: tuple[str, ...],
        native: bool,
        priority: int = 0,
        regions: Sequence[Sequence[Box]] | None = None,
        label: Label = PerImageError.at,
        check: Callable[[Sequence[Prepared]], None] | None = None,
    ) -> Ran:
        """Decode (decode pool), then batch and run every image's views; the path Extract and
        Compare share. Queue room is held from before decoding, so a full queue refuses at
        once; `label` names a failed image (index → message); `check` sees the decoded images
        before anything is submitted. Returns the prepared images, each image's worker
        outputs (one per view) and every item's batch info. If anything fails or the caller
        goes away, this request's other items are cancelled (dropped before compute)."""
        loaded = self.runtime.model(model)
        preprocessing = loaded.weights.preprocessing
        node_set = loaded.catalog.in_order(nodes)
        known = self._known.setdefault(model, OrderedDict())
        new = node_set not in known and not is_cached(loaded, node_set)
        if new:  # charged once: its concurrent requests are not new any more
            self.check_build(model)
            self._remember(known, node_set)
        n_views = len(spec.scales) * (2 if spec.flip else 1)
        boxes = regions or [()] * len(inputs)
        # futures[i][v]: view v of image i (TTA views are items of their own)
        futures: list[list[asyncio.Future[Any]]] = [[] for _ in inputs]
        try:
            await self.batcher.admit(len(inputs) * n_views)  # a client past its share waits
            with self.batcher.reserve(len(inputs) * n_views):
                prepared = await asyncio.gather(
                    *(
                        self.in_pool(
                            prepare_image,
                            img,
                            self.limits,
                            preprocessing,
                            native,
                            image_boxes,
                            spec.flip,
                            spec.scales,
                        )
                        for img, image_boxes in zip(inputs, boxes, strict=True)
                    ),
                    return_exceptions=True,
                )
                for index, result in enumerate(prepared):
                    if isinstance(result, PerImageError):
                        raise label(result, index)
                    if isinstance(result, BaseException):
                        raise result
                images: list[Prepared] = prepared  # type: ignore[assignment]
                if check is not None:
                    check(images)
                # one batch key per input shape: a batch must stack (a flip view has its
                # image's shape and batches with it; each scale with same-shaped views)
                groups: dict[tuple[int, ...], list[tuple[int, Item]]] = {}
                for index, image in enumerate(images):
                    for view in image.inputs():
                        item = Item(view.tensor, spec, nodes, view.boxes)
                        groups.setdefault(tuple(view.tensor.shape), []).append((index, item))
                for shape, entries in groups.items():
                    # requests for other node sets of the same model share the forward
                    submitted = self.batcher.submit_many(
                        (model, shape),
                        [item for _, item in entries],
                        reserved=True,
                        priority=priority,
                    )
                    for (i, _), fut in zip(entries, submitted, strict=True):
                        futures[i].append(fut)
            flat = [fut for per_image in futures for fut in per_image]
            done: list[tuple[dict[str, Any], BatchInfo]] = await asyncio.gather(*flat)
        except BaseException:  # client gone, queue full or a failed batch: drop our other items
            if new:  # not served: the next request of this set is new again
                known.pop(node_set, None)
            for per_image in futures:
                for fut in per_image:
                    if not fut.done():
                        fut.cancel()
            raise
        self._remember(known, node_set)
        rows: list[list[dict[str, Any]]] = []
        position = 0
        for per_image in futures:  # back to per-image view lists
            rows.append([r for r, _ in done[position : position + len(per_image)]])
            position += len(per_image)
        return Ran(images, rows, [info for _, info in done])

    def _remember(
        self, known: OrderedDict[tuple[str, ...], None], node_set: tuple[str, ...]
    ) -> None:
        known[node_set] = None
        known.move_to_end(node_set)
        while len(known) > KNOWN_SETS * self.settings.extractor_cache_size:
            known.popitem(last=False)

    async def admit(self, inputs: Sequence[ImageInput], spec: OutputSpec) -> None:
        """The calling client's wait for queue room (server/queue_room.py), before its memory
        is reserved; run_images checks again and holds the room."""
        views = len(spec.scales) * (2 if spec.flip else 1)
        await self.batcher.admit(len(inputs) * views)

    def check_build(self, model: str) -> None:
        """A node set new to the server (neither served lately nor cached) costs a build:
        refused (retryable) once the client has used its builds of the minute
        (server/build_budget.py). Served sets are remembered, because in a shared batch the
        worker builds the union of the batch's sets, so a set may be served often without an
        extractor of its own."""
        wait = self.builds.take(CLIENT.get().key, time.monotonic())
        if wait > 0:
            if self.metrics is not None:
                self.metrics.builds_refused.labels(self.metrics.model(model)).inc()
            raise QueueFull(
                f"this client has used its {self.builds.per_minute} extractor builds of the "
                "minute (max_builds_per_client_per_minute): each new node set builds one on "
                f"the worker; reuse node sets you have asked for, or retry in {wait:.1f} s"
            )

    async def estimate(
        self,
        model: str,
        inputs: Sequence[ImageInput],
        spec: OutputSpec,
        nodes: Sequence[str],
        native: bool,
        keep_maps: bool,
        answer: bool = True,
    ) -> Estimate:
        """The request's peak memory (budgets.peak_bytes), from headers and shapes only: native
        images' headers are read in the decode pool, nothing is decoded."""
        loaded = self.runtime.model(model)
        cost = self._costs.get(model)
        if cost is None:
            cost = self._costs[model] = model_cost(loaded.catalog.input_size, loaded.catalog.nodes)
        h, w = loaded.catalog.input_size
        if native and any(i.encoded is not None for i in inputs):
            sizes = await self.in_pool(_all_pixels, inputs, self.limits, native, h * w)
        else:  # constant work per image: the model's size, or a raw tensor's shape
            sizes = _all_pixels(inputs, self.limits, native, h * w)
        flips = 2 if spec.flip else 1
        views = [
            [max(1, round(pixels * scale * scale)) for scale in spec.scales for _ in range(flips)]
            for pixels, _ in sizes
        ]
        itemsize = ITEMSIZE[spec.dtype] if answer and spec.pool == "raw" else 0
        batch = batch_limit(self.settings, loaded.config, self.runtime.device.type)
        decoded = [d for _, d in sizes]
        return peak_bytes(cost, views, nodes, keep_maps, itemsize, batch, decoded)

    async def extract(self, job: ExtractJob) -> Extracted:
        """Run a validated Extract: images the result cache holds (server/result_cache.py;
        keys hashed in the decode pool) cost no decode, forward or memory; the others are
        computed (`compute`) and then stored."""
        if not self.results.enabled or job.bypass_result_cache:
            return await self.compute(job)
        weights = self.runtime.model(job.model).weights
        keys = await self.in_pool(image_keys, job, weights.sha256, weights.preprocessing)
        cached = self.results.get(job.model, keys)
        missing = [i for i, row in enumerate(cached) if row is None]
        if not missing:
            return Extracted(merge(cached, []), Ran([], [], []), 0.0)
        done = await self.compute(only(job, missing))  # a failure raises: nothing stored
        self.results.put(job.model, [keys[i] for i in missing], done.rows)
        return Extracted(merge(cached, done.rows), done.ran, done.encode_s)

    async def compute(self, job: ExtractJob) -> Extracted:
        """Compute a validated Extract: its memory reserved, its images' views through the
        worker, then the finish stage (TTA average, concat, post chain, dtype) and encoding in
        the decode pool."""
        keep = job.spec.pool == "raw"
        peak = await self.estimate(job.model, job.inputs, job.spec, job.nodes, job.native, keep)
        if keep and not any(job.regions):  # raw maps of a known size: refuse before compute
            estimate = int(peak.parts["answer"] / 2 / ESTIMATE_SLACK)
            tensors_fit(estimate, self.settings.max_message_bytes, estimated=True)
        await self.admit(job.inputs, job.spec)  # a wait for queue room holds no memory
        with self.memory.reserve(peak, CLIENT.get().key, job.native):
            return await self._extract(job)

    async def _extract(self, job: ExtractJob) -> Extracted:
        ran = await self.run_images(
            job.model, job.inputs, job.spec, job.nodes, job.native, job.priority, job.regions
        )
        encode_started = time.perf_counter()
        rows = await self.in_pool(
            finish_results, ran.rows, job.nodes, job.spec, self.heads, job.concat_key
        )
        encode_s = time.perf_counter() - encode_started
        size = sum(len(t.data) for row in rows for t in row.values())
        tensors_fit(size, self.settings.max_message_bytes)
        self.observe(job.model, ran, encode_s, size)
        return Extracted(rows, ran, encode_s)

    async def parameters(
        self, model: str, names: Sequence[str], dtype: str
    ) -> dict[str, EncodedTensor]:
        """GetParameters' tensors, read on the worker and encoded in the decode pool."""
        limit = self.settings.max_parameter_bytes
        tensors = await self.runtime.parameters(model, names, dtype, limit)
        (encoded,) = await self.in_pool(encode_results, [dict(tensors)])
        return dict(encoded)

    def observe(self, model: str, ran: Ran, finish_s: float, output_bytes: int | None) -> None:
        """Stage metrics of one request: queue, decode, compute (once per batch), and the stage
        after compute (Extract's finish and encode, Compare's distance math)."""
        m = self.metrics
        if m is None:
            return
        for info in ran.infos:
            m.stage_seconds.labels("queue").observe(info.queue_s)
        for image in ran.images:
            m.stage_seconds.labels("decode").observe(image.decode_s)
        for run_s in {i.batch_id: i.run_s for i in ran.infos}.values():
            m.stage_seconds.labels("compute").observe(run_s)
        m.stage_seconds.labels("encode").observe(finish_s)
        m.images.labels(model).inc(len(ran.images))
        if output_bytes is not None:
            m.output_bytes.labels(model).inc(output_bytes)


def _all_pixels(
    inputs: Sequence[ImageInput], limits: DecodeLimits, native: bool, model_pixels: int
) -> list[tuple[int, int]]:
    return [input_pixels(image, limits, native, model_pixels) for image in inputs]
