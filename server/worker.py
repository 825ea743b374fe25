"""The model runtime: one worker thread per device owns every model, extractor and forward.

Nothing here runs on the event loop: async methods only hand work to the worker thread. Building
an extractor and running it happen on that same thread, so a build for a new node set happens
once even when many requests ask at once, and no tracing can race a forward.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import fx

from . import models as model_loading
from .catalog import Catalog, NodeSpec, build_catalog, build_extractor, module_tree
from .errors import InvalidArgument, LimitExceeded, ModelNotFound, Unavailable
from .metrics import Metrics
from .pooling import OutputSpec, pool
from .preprocess import Preprocessing
from .settings import ModelConfig, Settings

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


@dataclass
class Item:
    """One image on its way through the batcher: model input plus what to do with the output."""

    tensor: torch.Tensor  # float32 [3, H, W], preprocessed, CPU
    spec: OutputSpec
    nodes: tuple[str, ...]  # resolved full node names this image's request wants


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: model_loading.LoadedWeights
    catalog: Catalog
    modules: list[tuple[str, str, int]]
    n_prefix_tokens: int
    extractors: OrderedDict[tuple[str, ...], fx.GraphModule] = field(default_factory=OrderedDict)


def _is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's equivalent RuntimeError."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise model_loading.ModelLoadError(f"device {name!r} requested but CUDA is not available")
    return device


def _import_all(specs: Sequence[str]) -> list[Any]:
    return [model_loading.import_object(s) for s in specs]


class ModelRuntime:
    """Every configured model on one device, behind one worker thread."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = pick_device(settings.device)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"worker-{self.device}"
        )
        self._models: dict[str, LoadedModel] = {}
        self._errors: dict[str, str] = {}
        self._bases: dict[tuple[object, ...], model_loading.LoadedWeights] = {}
        self._batch_caps: dict[str, int] = {}
        self._ready = threading.Event()
        self._configs = {m.name: m for m in settings.models}
        self.worker_thread_ident: int | None = None

    # --- plumbing -------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _on_worker_start(self) -> None:
        self.worker_thread_ident = threading.get_ident()
        if self.settings.torch_threads > 0:
            torch.set_num_threads(self.settings.torch_threads)

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
                loaded = await self._call(self._load, cfg)
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

    def _load(self, cfg: ModelConfig) -> LoadedModel:
        started = time.monotonic()
        key = model_loading.base_key(cfg)
        shared = self._bases.get(key)
        if shared is not None:  # same architecture and weights as an earlier entry
            loaded = shared.for_entry(cfg)
        else:
            loaded = model_loading.build_model(cfg)
            loaded.module = loaded.module.to(self.device).eval()
            self._bases[key] = loaded
        module = loaded.module
        try:
            catalog = build_catalog(
                module,
                loaded.preprocessing.crop_size,
                leaf_modules=_import_all(cfg.leaf_modules),
                autowrap_functions=_import_all(cfg.autowrap_functions),
            )
        except Exception as exc:
            raise model_loading.ModelLoadError(
                f"model {cfg.name!r}: torch.fx cannot trace it ({type(exc).__name__}: {exc}); "
                "mark the offending modules in leaf_modules or functions in autowrap_functions"
            ) from exc
        module.eval()
        n_prefix = 1 if hasattr(module, "class_token") else 0
        result = LoadedModel(cfg, loaded, catalog, module_tree(module), n_prefix)
        if self.settings.warmup and catalog.nodes:
            self._warm_up(result)
        log.info("loaded %s (%s) in %.1fs", cfg.name, loaded.weights_id, time.monotonic() - started)
        return result

    def _warm_up(self, loaded: LoadedModel) -> None:
        """One real forward of a zero image through the whole graph before serving."""
        h, w = loaded.catalog.input_size
        last = (loaded.catalog.nodes[-1].name,)
        extractor = self._extractor(loaded, last)
        with torch.inference_mode():
            extractor(torch.zeros(1, 3, h, w, device=self.device))

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
        arch = cfg.arch or cfg.factory or ""
        loaded = self._models.get(name)
        if loaded is None:
            message = self._errors.get(name, "loading")
            return ModelStatus(
                name, arch, cfg.weights, "", False, (0, 0), None, str(self.device), False, message
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
            message=w.note,
        )

    def _not_found(self, name: str) -> str:
        shown = repr(name[:80])
        return f"model {shown} is not served here; available: {', '.join(self._configs) or 'none'}"

    def model(self, name: str) -> LoadedModel:
        """The loaded model, or ModelNotFound / Unavailable (still loading or failed)."""
        if not name:
            raise InvalidArgument("model is empty; call ListModels for the served names")
        if name not in self._configs:
            raise ModelNotFound(self._not_found(name))
        loaded = self._models.get(name)
        if loaded is None:
            if name in self._errors:
                raise Unavailable(f"model {name!r} failed to load: {self._errors[name]}")
            raise Unavailable(f"model {name!r} is still loading; retry shortly")
        return loaded

    def resolve(self, name: str, requested: Sequence[str]) -> list[NodeSpec]:
        catalog = self.model(name).catalog
        return [catalog.by_name[catalog.resolve(r)] for r in requested]

    # --- compute (worker thread only) ---------------------------------------------------
    async def run_batch(self, key: Hashable, items: list[Item]) -> list[dict[str, torch.Tensor]]:
        return await self._call(self._forward, key, items)

    def _extractor(self, loaded: LoadedModel, nodes: tuple[str, ...]) -> fx.GraphModule:
        cache = loaded.extractors
        name = loaded.config.name
        m = self.metrics
        if nodes in cache:
            cache.move_to_end(nodes)
            if m is not None:
                m.cache_hits.labels(name).inc()
            return cache[nodes]
        started = time.perf_counter()
        extractor = build_extractor(loaded.catalog, nodes)
        cache[nodes] = extractor
        evicted = 0
        while len(cache) > self.settings.extractor_cache_size:
            cache.popitem(last=False)
            evicted += 1
        if m is not None:
            m.cache_misses.labels(name).inc()
            m.build_seconds.labels(name).observe(time.perf_counter() - started)
            m.cache_evictions.labels(name).inc(evicted)
            m.cache_entries.labels(name).set(len(cache))
        return extractor

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

    def _forward_once(self, key: Hashable, items: list[Item]) -> list[dict[str, torch.Tensor]]:
        model_name: str
        shape: tuple[int, ...]
        model_name, shape = key  # type: ignore[misc]
        loaded = self.model(model_name)
        # One forward serves every request in the batch: the extractor returns the union of
        # their node sets (in execution order, so equal unions share one cached extractor).
        order = loaded.catalog.order
        nodes = tuple(sorted({n for item in items for n in item.nodes}, key=order.__getitem__))
        extractor = self._extractor(loaded, nodes)
        batch = torch.stack([i.tensor for i in items]).to(self.device, non_blocking=True)
        loaded.weights.module.eval()  # nothing may have flipped it, but BatchNorm must be eval
        extractor.eval()
        try:
            with torch.inference_mode():
                outputs = extractor(batch)
        except (RuntimeError, AssertionError, ValueError) as exc:
            if _is_oom(exc) or tuple(shape[1:]) == tuple(loaded.catalog.input_size):
                raise  # at the model's own input size this is a bug: INTERNAL
            size = loaded.catalog.input_size
            raise InvalidArgument(
                f"model {model_name!r} cannot run on input {shape[1]}x{shape[2]} "
                f"(its input size is {size[0]}x{size[1]}): "
                f"{str(exc).splitlines()[0][:200]}"
            ) from exc
        results: list[dict[str, torch.Tensor]] = [{} for _ in items]
        groups: dict[tuple[OutputSpec, tuple[str, ...]], list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault((item.spec, item.nodes), []).append(index)
        with torch.inference_mode():
            for (spec, wanted), indices in groups.items():
                idx = torch.tensor(indices, device=self.device)
                for name in wanted:
                    layout = loaded.catalog.by_name[name].layout
                    value = outputs[name]
                    part = value if len(indices) == len(items) else value.index_select(0, idx)
                    pooled = pool(part, layout, spec, loaded.n_prefix_tokens).cpu()
                    for j, index in enumerate(indices):
                        results[index][name] = pooled[j]
        return results

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
