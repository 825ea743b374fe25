"""The model runtime: one worker thread per device owns every model, extractor and forward.

Nothing here runs on the event loop: async methods only hand work to the worker thread. Loading
(server/loading.py), building an extractor and running it (server/extractors.py) and reading
parameters (server/parameters.py) happen on that same thread, so a build for a new node set
happens once even when many requests ask at once, and no tracing (or torch.compile) can race a
forward. This module keeps the thread, the model lookups and the batch forward: out-of-memory
halving and the pooling of each group of items. Several devices mean several runtimes
(server/dispatch.py), each with its own thread and copy.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Container, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from . import thread_roles
from .catalog import NodeSpec
from .devices import pick_device, stack_batch
from .errors import InvalidArgument, LimitExceeded, ModelNotFound, Unavailable, without_paths
from .extractors import cached_extractor, run_extractor
from .loaded import LoadedModel
from .loading import ModelLoader, SharedWeights  # app imports SharedWeights from here
from .metrics import Metrics
from .parameters import read_parameters
from .pooling import DTYPES, OutputSpec, finish_raw, pool_maps, roi_pool
from .preprocess import Preprocessing
from .process import pin_torch_threads
from .settings import Settings
from .spec import check_name_length

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ModelStatus:
    """What ListModels reports; plain data, safe to read from the event loop."""

    name: str
    architecture: str
    weights: str
    weights_sha256: str
    random_weights: bool
    input_size: tuple[int, int]
    preprocessing: Preprocessing | None
    device: str
    ready: bool
    message: str
    compute_dtype: str = "float32"
    prefix_tokens: int = 0
    extraction_mode: str = ""  # "fx" | "hooks" once loaded
    source: str = ""  # ModelConfig.source


@dataclass
class Item:
    """One image on its way through the batcher: model input plus what to do with the output."""

    tensor: torch.Tensor  # float32 [3, H, W], preprocessed; CPU, or CUDA when GPU-decoded
    spec: OutputSpec
    nodes: tuple[str, ...]  # resolved full node names this image's request wants
    # region boxes (x1, y1, x2, y2) in this tensor's pixels, float32 [R, 4]; None: whole image
    boxes: torch.Tensor | None = None


def _is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's equivalent RuntimeError."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _first_line(exc: BaseException) -> str:
    """The error's first line, without fx's trace-time placeholders (`Proxy(getitem_2)`)."""
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r"Proxy\([^)]*\)", "another size", line)[:200]


class ModelRuntime:
    """Every configured model on one device, behind one worker thread."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        device: str | None = None,
        torch_threads: int | None = None,
        shared: SharedWeights | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.shared = shared
        self.device = pick_device(device or settings.device)
        self.torch_threads = torch_threads
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"worker-{self.device}",
            initializer=thread_roles.register,
            initargs=("worker",),
        )
        self._models: dict[str, LoadedModel] = {}
        self._errors: dict[str, str] = {}
        # builds each entry on this device (worker thread only), sharing base models
        self._loader = ModelLoader(settings, self.device, metrics, shared)
        self._batch_caps: dict[str, int] = {}
        self._ready = threading.Event()
        self._configs = {m.name: m for m in settings.models}
        self.worker_thread_ident: int | None = None

    # --- plumbing -------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _on_worker_start(self) -> None:
        self.worker_thread_ident = threading.get_ident()
        threads = self.torch_threads or self.settings.torch_threads
        if threads > 0:
            pin_torch_threads(threads)

    # --- loading --------------------------------------------------------------------------
    async def load_all(
        self, on_model: Callable[[str, bool], Awaitable[None]] | None = None
    ) -> None:
        """Load (and warm up) every configured model on the worker, one by one; each is ready
        when loaded. `on_model(name, ok)` hears about each (health status, for one)."""
        await self._call(self._on_worker_start)
        for cfg in self.settings.models:
            ok = False
            try:
                loaded = await self._call(self._loader.load, cfg)
                self._models[cfg.name] = loaded
                ok = True
                log.info("model %s ready on %s", cfg.name, self.device)
                if self.metrics is not None:
                    module = loaded.weights.module
                    size = sum(t.numel() * t.element_size() for t in module.parameters())
                    size += sum(t.numel() * t.element_size() for t in module.buffers())
                    self.metrics.model_memory.labels(cfg.name).set(size)
                    self.metrics.model_ready.labels(cfg.name).set(1)
            except Exception as exc:  # one bad entry must not stop the others
                message = str(exc) or type(exc).__name__
                self._errors[cfg.name] = message
                log.error("model %s failed to load: %s", cfg.name, message, exc_info=True)
            if on_model is not None:
                await on_model(cfg.name, ok)
        self._ready.set()

    def ready_models(self) -> list[str]:
        return list(self._models)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every model has finished loading (successfully or not)."""
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait, timeout)

    # --- lookups (plain data; event-loop safe) -------------------------------------------
    def names(self) -> list[str]:
        return list(self._configs)

    def status(self, name: str) -> ModelStatus:
        cfg = self._configs.get(name)
        if cfg is None:
            raise ModelNotFound(self._not_found(name))
        arch = cfg.arch or cfg.factory or cfg.path or ""
        loaded = self._models.get(name)
        if loaded is None:
            message = without_paths(self._errors.get(name, "loading"))
            weights = without_paths(cfg.weights)
            return ModelStatus(
                name,
                arch,
                weights,
                "",
                False,
                (0, 0),
                None,
                str(self.device),
                False,
                message,
                source=cfg.source,
            )
        w = loaded.weights
        return ModelStatus(
            name=name,
            architecture=arch,
            weights=w.weights_id,
            weights_sha256=w.sha256,
            random_weights=w.random,
            input_size=w.preprocessing.crop_size,
            preprocessing=w.preprocessing,
            device=str(self.device),
            ready=True,
            message=without_paths(w.note),
            compute_dtype=loaded.config.autocast or "float32",
            prefix_tokens=loaded.n_prefix_tokens,
            extraction_mode=loaded.catalog.mode,
            source=cfg.source,
        )

    def _not_found(self, name: str, visible: Container[str] | None = None) -> str:
        """The NOT_FOUND message; `visible`: the names this caller may see (a token's models),
        so a model outside them reads exactly like one that is not configured."""
        names = self._configs if visible is None else [n for n in self._configs if n in visible]
        return f"model {name[:80]!r} is not served here; available: {', '.join(names) or 'none'}"

    def not_found(self, name: str, visible: Container[str] | None = None) -> ModelNotFound:
        return ModelNotFound(self._not_found(name, visible))

    def model(self, name: str) -> LoadedModel:
        """The loaded model, or ModelNotFound / Unavailable (still loading or failed)."""
        if not name:
            raise InvalidArgument("model is empty; call ListModels for the served names")
        check_name_length(name, "model", "call ListModels for the served names")  # before hashing
        if name not in self._configs:
            raise ModelNotFound(self._not_found(name))
        loaded = self._models.get(name)
        if loaded is None:
            if name in self._errors:
                reason = without_paths(self._errors[name])
                raise Unavailable(f"model {name!r} failed to load: {reason}")
            raise Unavailable(f"model {name!r} is still loading; retry shortly")
        return loaded

    def resolve(self, name: str, requested: Sequence[str]) -> list[NodeSpec]:
        catalog = self.model(name).catalog
        return [catalog.by_name[catalog.resolve(r)] for r in requested]

    # --- compute (worker thread only) ---------------------------------------------------
    async def run_batch(self, key: Hashable, items: list[Item]) -> list[dict[str, torch.Tensor]]:
        return await self._call(self._forward, key, items)

    def batch_cap(self, model: str) -> int | None:
        """A lower batch limit learnt from out-of-memory errors, if any (read by the batcher)."""
        return self._batch_caps.get(model)

    def _forward(self, key: Hashable, items: list[Item]) -> list[dict[str, torch.Tensor]]:
        """Run one batch; on device out-of-memory, split it in halves (and remember the smaller
        size for that model) rather than fail every request in it."""
        try:
            return self._forward_once(key, items)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            model_name = key[0]  # type: ignore[index]
            if len(items) == 1:
                raise LimitExceeded(
                    f"model {model_name!r} ran out of {self.device.type} memory on a single "
                    "image; send a smaller image or fewer/pooled nodes"
                ) from exc
            half = len(items) // 2
            # the largest batch not yet seen to fail; halves keep probing below it
            cap = min(self._batch_caps.get(model_name, len(items)), len(items) - 1)
            self._batch_caps[model_name] = cap
            log.warning(
                "model %s: out of memory at batch %d; splitting, batch limit now %d",
                model_name,
                len(items),
                self._batch_caps[model_name],
            )
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return self._forward(key, items[:half]) + self._forward(key, items[half:])

    def _stack(self, items: list[Item]) -> torch.Tensor:
        return stack_batch([i.tensor for i in items], self.device)

    def _forward_once(self, key: Hashable, items: list[Item]) -> list[dict[str, torch.Tensor]]:
        # the batch key is (model, input shape[, node set]): see Batcher.group_key
        model_name: str = key[0]  # type: ignore[index]
        shape: tuple[int, ...] = key[1]  # type: ignore[index]
        loaded = self.model(model_name)
        # One forward serves every request in the batch: the extractor returns the union of
        # their node sets (in execution order, so equal unions share one cached extractor).
        nodes = loaded.catalog.in_order(n for item in items for n in item.nodes)
        extractor = cached_extractor(
            loaded, nodes, self.settings.extractor_cache_size, self.metrics
        )
        batch = self._stack(items)
        try:
            outputs = run_extractor(loaded, extractor, batch, self.device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            if _is_oom(exc) or tuple(shape[1:]) == tuple(loaded.catalog.input_size):
                raise  # at the model's own input size this is a bug: INTERNAL
            size = loaded.catalog.input_size
            raise InvalidArgument(
                f"model {model_name!r} cannot run on input {shape[1]}x{shape[2]} "
                f"(its input size is {size[0]}x{size[1]}; native_resolution, raw tensors of "
                f"other sizes and tta.scales other than 1 change it): {_first_line(exc)}"
            ) from exc
        results: list[dict[str, torch.Tensor] | BaseException] = [{} for _ in items]
        groups: dict[tuple[OutputSpec, tuple[str, ...], bool], list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault((item.spec, item.nodes, item.boxes is not None), []).append(index)
        input_hw = (int(batch.shape[-2]), int(batch.shape[-1]))
        for (spec, _, _), indices in groups.items():
            try:
                pooled = self._pool_group(
                    loaded, outputs, [items[i] for i in indices], indices, len(items), input_hw
                )
            except Exception as exc:  # this group's requests fail, not the batch's others
                if _is_oom(exc):
                    raise
                log.debug("pooling %s for %d items failed: %r", spec, len(indices), exc)
                for index in indices:
                    results[index] = exc
                continue
            for index, row in zip(indices, pooled, strict=True):
                results[index] = row
        return results  # type: ignore[return-value]  # per-item errors: the batcher's contract

    def _pool_group(
        self,
        loaded: LoadedModel,
        outputs: dict[str, torch.Tensor],
        items: list[Item],
        indices: list[int],
        batch_size: int,
        input_hw: tuple[int, int],
    ) -> list[dict[str, torch.Tensor]]:
        """One group's outputs (same spec, nodes and with/without regions), on the CPU: pooled
        float32 [D] / [R, D] (finished later, in the service's decode pool) or finished raw
        maps [...] / [R, C, s, s]."""
        spec, wanted = items[0].spec, items[0].nodes
        rows: list[dict[str, torch.Tensor]] = [{} for _ in items]
        with torch.inference_mode():
            idx = torch.tensor(indices, device=self.device)
            for name in wanted:
                layout = loaded.catalog.by_name[name].layout
                value = outputs[name]
                part = value if len(indices) == batch_size else value.index_select(0, idx)
                if items[0].boxes is not None:
                    # one image at a time: roi_align's bins ([R, C, s, s] before pooling) are
                    # bounded per image (service.MAX_ROI_BINS), not per batch
                    for j, (row, item) in enumerate(zip(rows, items, strict=True)):
                        assert item.boxes is not None
                        (out,) = roi_pool(part[j : j + 1], layout, [item.boxes], spec, input_hw)
                        if spec.pool == "raw":
                            out = finish_raw(out, spec)
                        row[name] = out.cpu()
                    continue
                if spec.pool == "raw":
                    done = finish_raw(part, spec).cpu()
                else:
                    prefix = loaded.catalog.prefix_tokens(name, loaded.n_prefix_tokens)
                    done = pool_maps(part, layout, spec, prefix).cpu()
                for j, row in enumerate(rows):
                    row[name] = done[j]
        return rows

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- parameters (worker thread) -----------------------------------------------------
    async def parameters(
        self, model: str, names: Sequence[str], dtype: str, max_bytes: int
    ) -> list[tuple[str, torch.Tensor]]:
        """Named parameters/buffers, or a module path's own parameters, as CPU copies in
        `dtype` (a pooling.DTYPES name), in request order (duplicates once). Read on the
        worker thread, where the model lives, so no forward or transfer runs beside it."""
        loaded = self.model(model)  # NOT_FOUND / UNAVAILABLE before touching the worker
        return await self._call(read_parameters, loaded, tuple(names), DTYPES[dtype], max_bytes)
