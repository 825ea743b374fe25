"""The model runtime: one worker thread per device owns every model, extractor and forward.

Nothing here runs on the event loop: async methods only hand work to the worker thread. Building
an extractor and running it happen on that same thread, so a build for a new node set happens
once even when many requests ask at once, and no tracing (or torch.compile) can race a forward.
Several devices mean several runtimes (server/dispatch.py), each with its own thread and copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import difflib
import logging
import os
import re
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from . import models as model_loading
from .catalog import (
    Catalog,
    NodeSpec,
    build_catalog,
    build_extractor,
    default_prefix_tokens,
    module_tree,
)
from .errors import InvalidArgument, LayertapError, LimitExceeded, ModelNotFound, Unavailable
from .fusion import fold_batchnorms
from .hooks import build_hook_catalog, build_hook_extractor
from .metrics import Metrics
from .pooling import DTYPES, OutputSpec, finish_raw, pool_maps, roi_pool
from .preprocess import Preprocessing
from .process import pin_torch_threads
from .settings import ModelConfig, Settings, batch_limit

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


@dataclass
class Item:
    """One image on its way through the batcher: model input plus what to do with the output."""

    tensor: torch.Tensor  # float32 [3, H, W], preprocessed; CPU, or CUDA when GPU-decoded
    spec: OutputSpec
    nodes: tuple[str, ...]  # resolved full node names this image's request wants
    # region boxes (x1, y1, x2, y2) in this tensor's pixels, float32 [R, 4]; None: whole image
    boxes: torch.Tensor | None = None


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: model_loading.LoadedWeights
    catalog: Catalog
    modules: list[tuple[str, str, int]]
    n_prefix_tokens: int
    # fx.GraphModule, or its torch.compile wrapper when the model is compiled
    extractors: OrderedDict[tuple[str, ...], torch.nn.Module] = field(default_factory=OrderedDict)
    autocast: torch.dtype | None = None
    # conv + BatchNorm pairs folded into one convolution, shared by this model's extractors
    folded: dict[tuple[str, str], torch.nn.Module] = field(default_factory=dict)
    # weights and input batches in channels-last memory format (config, or chosen at load)
    channels_last: bool = False


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


# A model whose batch forward takes less than this is not timed for channels-last.
SMALL_FORWARD_MS = 20.0


def _forward_ms(module: torch.nn.Module, x: torch.Tensor, runs: int = 3) -> float:
    """Median ms of `runs` forwards after one untimed (allocator, kernel choice); the caller
    sets the compute mode."""
    times = []
    for i in range(runs + 1):
        started = time.perf_counter()
        module(x)
        if i:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise model_loading.ModelLoadError(f"device {name!r} requested but CUDA is not available")
    return device


def _import_all(specs: Sequence[str]) -> list[Any]:
    return [model_loading.import_object(s) for s in specs]


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_torch_threads(settings: Settings, cpu_workers: int = 1) -> int:
    """Intra-op threads per worker: torch_threads when set, else the usable cores split between
    the CPU workers (at least 1), so N workers never run N x cores threads. The decode pool's
    threads run torch single-threaded (prepare.init_decode_thread) and are busy a small share
    of the time (decode is a few ms per image, the forward tens), so they are not subtracted."""
    if settings.torch_threads > 0:
        return settings.torch_threads
    return max(1, usable_cores() // max(1, cpu_workers))


def _submodule(cfg: ModelConfig, module: torch.nn.Module) -> torch.nn.Module:
    """The configured `submodule` of the built model, or a load error listing the top ones."""
    try:
        return module.get_submodule(cfg.submodule)
    except AttributeError:
        children = ", ".join(name for name, _ in module.named_children())
        raise model_loading.ModelLoadError(
            f"model {cfg.name!r}: {type(module).__name__} has no submodule {cfg.submodule!r}; "
            f"its children are: {children} (DescribeModel of the whole model lists every path)"
        ) from None


class SharedWeights:
    """Models built once (on the CPU) for several runtimes: each device gets a copy of the same
    module, so random-init models agree across devices and files are read once. Thread-safe:
    the devices' workers load in parallel."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built: dict[tuple[object, ...], model_loading.LoadedWeights] = {}

    def copy_of(self, cfg: ModelConfig) -> model_loading.LoadedWeights:
        key = model_loading.base_key(cfg)
        with self._lock:
            if key not in self._built:
                self._built[key] = model_loading.build_model(cfg)
            built = self._built[key]
        return dataclasses.replace(built, module=copy.deepcopy(built.module)).for_entry(cfg)

    def clear(self) -> None:
        with self._lock:
            self._built.clear()


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
            max_workers=1, thread_name_prefix=f"worker-{self.device}"
        )
        self._models: dict[str, LoadedModel] = {}
        self._errors: dict[str, str] = {}
        self._bases: dict[tuple[object, ...], model_loading.LoadedWeights] = {}
        self._layouts: dict[tuple[object, ...], bool] = {}  # base key -> channels-last
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

    def _autocast_dtype(self, cfg: ModelConfig) -> torch.dtype | None:
        if not cfg.autocast:
            return None
        if cfg.autocast == "float16" and self.device.type != "cuda":
            raise model_loading.ModelLoadError(
                f"model {cfg.name!r}: autocast = 'float16' needs a CUDA device (this worker "
                f"runs on {self.device}); use 'bfloat16' on CPU, or leave autocast empty"
            )
        return DTYPES[cfg.autocast]

    def _load(self, cfg: ModelConfig) -> LoadedModel:
        started = time.monotonic()
        autocast = self._autocast_dtype(cfg)  # refuse before any weights are read
        key = (*model_loading.base_key(cfg), cfg.channels_last)
        shared = self._bases.get(key)
        if shared is not None:  # same architecture and weights as an earlier entry
            loaded = shared.for_entry(cfg)
        else:
            if self.shared is not None:
                loaded = self.shared.copy_of(cfg)
            else:
                loaded = model_loading.build_model(cfg)
            module = loaded.module.to(self.device)
            if cfg.channels_last:
                module = module.to(memory_format=torch.channels_last)
            loaded.module = module.eval()
            self._bases[key] = loaded
        if cfg.submodule:  # the base (whole model) stays shared; this entry serves a part
            loaded = dataclasses.replace(loaded, module=_submodule(cfg, loaded.module))
        module = loaded.module
        catalog = self._catalog(cfg, module, loaded.preprocessing.crop_size)
        module.eval()
        n_prefix = cfg.prefix_tokens if cfg.prefix_tokens >= 0 else default_prefix_tokens(module)
        result = LoadedModel(cfg, loaded, catalog, module_tree(module), n_prefix, autocast=autocast)
        if key not in self._layouts:  # decided once per base model
            self._layouts[key] = self._pick_channels_last(result)
        result.channels_last = self._layouts[key]
        self._warm_up(result)
        log.info("loaded %s (%s) in %.1fs", cfg.name, loaded.weights_id, time.monotonic() - started)
        return result

    def _pick_channels_last(self, loaded: LoadedModel) -> bool:
        """The entry's `channels_last`, or for "auto" (None) on the CPU: channels-last when
        the model's deepest-node extractor (folded, as requests will run it) runs in it and
        its forward at the model's batch size (at most 8; median of 3 interleaved rounds) is
        at least 10 % faster there; else the default layout (also when `warmup` is off, or the
        forward takes under SMALL_FORWARD_MS, or the model has at most one convolution, as
        ViT and Swin do). Models that cannot take it (5-D convolutions, code that `.view`s an
        NCHW map) stay in the default layout. Converts the weights in place when chosen."""
        cfg, module = loaded.config, loaded.weights.module
        if cfg.channels_last is not None:
            return cfg.channels_last
        if self.device.type != "cpu" or cfg.submodule or cfg.compile or not loaded.catalog.nodes:
            return False
        if not self.settings.warmup:  # no forward at load was asked for: nothing is timed
            return False
        dims = [p.dim() for p in module.parameters()]
        if 5 in dims:
            return False
        if dims.count(4) <= 1:  # a transformer's patch embedding at most: nothing to speed up
            return False
        extractor = self._extractor(loaded, (loaded.catalog.nodes[-1].name,), warm_up=True)
        # at the batch size this model will mostly run (channels-last gains grow with it)
        batch = batch_limit(self.settings, cfg, self.device.type)
        x = torch.zeros(min(8, batch), 3, *loaded.catalog.input_size, device=self.device)
        layouts = (torch.contiguous_format, torch.channels_last)
        times: dict[torch.memory_format, list[float]] = {f: [] for f in layouts}

        def timed(inputs: torch.Tensor, runs: int = 3) -> float:
            with self._compute_mode(loaded):  # as requests run it (autocast included)
                return _forward_ms(extractor, inputs, runs)

        try:
            if timed(x, runs=1) < SMALL_FORWARD_MS:
                return False  # a few ms at most to win: not worth the timing
            for _ in range(3):  # interleaved rounds: drift on a busy machine hits both alike
                for layout in layouts:
                    extractor.to(memory_format=layout)
                    module.to(memory_format=layout)
                    times[layout].append(timed(x.contiguous(memory_format=layout)))
            plain, last = (statistics.median(times[f]) for f in layouts)
        except Exception as exc:  # any failure means: not in this layout
            log.info("model %s: default layout (a channels-last forward failed: %s)", cfg.name, exc)
            plain, last = float("nan"), float("inf")
        chosen = last < 0.9 * plain
        if not chosen:
            extractor.to(memory_format=torch.contiguous_format)
            module.to(memory_format=torch.contiguous_format)
        log.info(
            "model %s: %s layout (batch-%d forward %.1f ms default, %.1f ms channels-last)",
            cfg.name,
            "channels-last" if chosen else "default",
            x.shape[0],
            plain,
            last,
        )
        return chosen

    def _catalog(
        self, cfg: ModelConfig, module: torch.nn.Module, input_size: tuple[int, int]
    ) -> Catalog:
        """The node catalogue in the entry's extraction mode: fx ("fx"; "auto" first) or forward
        hooks ("hooks"; "auto" when tracing fails, with the trace error as the reason)."""
        if cfg.extraction == "hooks":
            reason = "configured: extraction = 'hooks'"
        else:
            try:
                catalog = build_catalog(
                    module,
                    input_size,
                    leaf_modules=_import_all(cfg.leaf_modules),
                    autowrap_functions=_import_all(cfg.autowrap_functions),
                )
            except model_loading.ModelLoadError:
                raise  # a bad leaf_modules / autowrap_functions import path
            except Exception as exc:
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                if cfg.extraction == "fx":
                    raise model_loading.ModelLoadError(
                        f"model {cfg.name!r}: torch.fx cannot trace it ({error}); mark the "
                        "offending modules in leaf_modules or functions in autowrap_functions, "
                        "or set extraction = 'hooks' (or 'auto') to serve module outputs "
                        "through forward hooks"
                    ) from exc
                reason = f"torch.fx cannot trace it ({error}); serving module outputs through hooks"
                log.warning("model %s: %s", cfg.name, reason)
            else:
                catalog.reason = (
                    "configured: extraction = 'fx'"
                    if cfg.extraction == "fx"
                    else "torch.fx traced the eval graph (extraction = 'auto')"
                )
                return catalog
        if cfg.compile:
            reason += "; compile is ignored in hooks mode"
        try:
            return build_hook_catalog(module, input_size, self.device, reason)
        except Exception as exc:
            raise model_loading.ModelLoadError(
                f"model {cfg.name!r}: the discovery forward for hooks extraction failed at "
                f"input {input_size[0]}x{input_size[1]} ({type(exc).__name__}: {exc})"
                + ("" if cfg.extraction == "hooks" else f"; before that, {reason}")
            ) from exc

    def _warm_up(self, loaded: LoadedModel) -> None:
        """Before the model reports ready: build (and compile) the extractors of its
        `warmup_nodes` and run each on a zero batch per `warmup_batch_sizes`, so their first
        request neither traces nor compiles; with `warmup`, the whole graph too. These builds
        are not cache misses: no request waited for them."""
        cfg, catalog = loaded.config, loaded.catalog
        sets: list[tuple[str, ...]] = []
        if self.settings.warmup and catalog.nodes:
            sets.append((catalog.nodes[-1].name,))
        for group in cfg.warmup_nodes:
            try:
                resolved = {catalog.resolve(name) for name in group}
            except LayertapError as exc:
                raise model_loading.ModelLoadError(
                    f"model {cfg.name!r}: warmup_nodes entry {list(group)}: {exc}"
                ) from exc
            sets.append(catalog.in_order(resolved))
        h, w = catalog.input_size
        for nodes in dict.fromkeys(sets):
            extractor = self._extractor(loaded, nodes, warm_up=True)
            for size in cfg.warmup_batch_sizes:
                batch = torch.zeros(size, 3, h, w, device=self.device)
                self._run_extractor(loaded, extractor, batch)

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
            compute_dtype=loaded.config.autocast or "float32",
            prefix_tokens=loaded.n_prefix_tokens,
            extraction_mode=loaded.catalog.mode,
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

    def _extractor(
        self, loaded: LoadedModel, nodes: tuple[str, ...], warm_up: bool = False
    ) -> torch.nn.Module:
        cache = loaded.extractors
        name = loaded.config.name
        m = self.metrics
        if nodes in cache:
            cache.move_to_end(nodes)
            if m is not None and not warm_up:
                m.cache_hits.labels(name).inc()
            return cache[nodes]
        started = time.perf_counter()
        extractor: torch.nn.Module
        if loaded.catalog.mode == "hooks":
            extractor = build_hook_extractor(loaded.catalog, nodes)
        else:
            graph_module = build_extractor(loaded.catalog, nodes)
            if loaded.config.fold_batchnorm:
                fold_batchnorms(graph_module, loaded.folded)
            extractor = graph_module
        cfg = loaded.config
        if cfg.compile and loaded.catalog.mode == "fx":
            # compiled lazily by its first call, on this thread (torch.compile is not
            # thread-safe); each new batch size compiles again, hence warmup_batch_sizes
            options: dict[str, Any] = {"backend": cfg.compile_backend}
            if cfg.compile_backend == "inductor" and cfg.compile != "default":
                options["mode"] = cfg.compile
            extractor = torch.compile(extractor, **options)  # type: ignore[assignment]
        cache[nodes] = extractor
        evicted = 0
        while len(cache) > self.settings.extractor_cache_size:
            cache.popitem(last=False)
            evicted += 1
        if m is not None:
            if not warm_up:
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

    @contextlib.contextmanager
    def _compute_mode(self, loaded: LoadedModel) -> Iterator[None]:
        """inference_mode (thread-local: entered here, on the worker), plus autocast."""
        with torch.inference_mode():
            if loaded.autocast is None:
                yield
            else:
                with torch.autocast(self.device.type, dtype=loaded.autocast):
                    yield

    def _run_extractor(
        self, loaded: LoadedModel, extractor: torch.nn.Module, batch: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if loaded.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        loaded.weights.module.eval()  # nothing may have flipped it, but BatchNorm must be eval
        extractor.eval()
        with self._compute_mode(loaded):
            return extractor(batch)  # type: ignore[no-any-return]

    def _stack(self, items: list[Item]) -> torch.Tensor:
        """The batch on the device. For CUDA from the CPU: stacked straight into pinned host
        memory, then one asynchronous copy (ordered before the forward on the same stream; the
        results' .cpu() at the end waits for both). GPU-decoded images are already there: their
        memory is marked as used by this stream, so the decode stream cannot reuse it early."""
        tensors = [i.tensor for i in items]
        if self.device.type != "cuda":
            return torch.stack(tensors)
        if tensors[0].is_cuda:
            stream = torch.cuda.current_stream(self.device)
            for t in tensors:
                if t.device == self.device:
                    t.record_stream(stream)
            return torch.stack([t.to(self.device) for t in tensors])
        pinned = torch.empty((len(tensors), *tensors[0].shape), pin_memory=True)
        torch.stack(tensors, out=pinned)
        return pinned.to(self.device, non_blocking=True)

    def _forward_once(self, key: Hashable, items: list[Item]) -> list[dict[str, torch.Tensor]]:
        # the batch key is (model, input shape[, node set]): see Batcher.group_key
        model_name: str = key[0]  # type: ignore[index]
        shape: tuple[int, ...] = key[1]  # type: ignore[index]
        loaded = self.model(model_name)
        # One forward serves every request in the batch: the extractor returns the union of
        # their node sets (in execution order, so equal unions share one cached extractor).
        nodes = loaded.catalog.in_order(n for item in items for n in item.nodes)
        extractor = self._extractor(loaded, nodes)
        batch = self._stack(items)
        try:
            outputs = self._run_extractor(loaded, extractor, batch)
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
        return await self._call(self._parameters, loaded, tuple(names), DTYPES[dtype], max_bytes)

    def _parameters(
        self, loaded: LoadedModel, names: tuple[str, ...], dtype: torch.dtype, max_bytes: int
    ) -> list[tuple[str, torch.Tensor]]:
        module = loaded.weights.module
        tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
        tensors.update(module.named_buffers(remove_duplicate=False))
        modules = dict(module.named_modules(remove_duplicate=False))
        wanted: dict[str, torch.Tensor] = {}
        unknown: list[str] = []
        for name in names:
            if name in tensors:
                wanted.setdefault(name, tensors[name])
            elif name and name in modules:
                own = list(modules[name].named_parameters(prefix=name, recurse=False))
                if not own:
                    raise InvalidArgument(
                        f"module {name!r} ({type(modules[name]).__name__}) has no parameters "
                        "of its own (a module path returns its own parameters, not its "
                        "children's); name a submodule or a full parameter name — "
                        "DescribeModel's modules list own_parameters per module"
                    )
                for full, tensor in own:
                    wanted.setdefault(full, tensor)
            else:
                unknown.append(name)
        if unknown:
            candidates = [*tensors, *(m for m in modules if m)]
            close = difflib.get_close_matches(unknown[0], candidates, n=5, cutoff=0.5)
            hint = f"closest: {', '.join(map(repr, close))}; " if close else ""
            shown = ", ".join(repr(n[:80]) for n in unknown[:5])
            raise InvalidArgument(
                f"model {loaded.config.name!r} has no parameter, buffer or module named {shown}; "
                f"{hint}see DescribeModel's modules for the module paths"
            )
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = sum(t.numel() for t in wanted.values()) * itemsize
        if total > max_bytes:
            raise LimitExceeded(
                f"the {len(wanted)} requested parameters are {total} bytes as "
                f"{str(dtype).removeprefix('torch.')}, over max_parameter_bytes={max_bytes}; "
                "ask for fewer names per call or a 2-byte dtype"
            )
        with torch.inference_mode():
            return [
                (name, t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous())
                for name, t in wanted.items()
            ]
