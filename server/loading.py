"""Loading: a ModelConfig becomes a LoadedModel on one device, ready to serve (its catalogue,
compute dtype, memory layout and warmed-up extractors).

Runs on the device's worker thread only (server/worker.py calls it from load_all).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import auto_compile
from . import models as model_loading
from .catalog import Catalog, build_catalog, default_prefix_tokens, module_tree
from .errors import LayertapError
from .extractors import cached_extractor, compute_mode, run_extractor
from .hooks import build_hook_catalog
from .loaded import LoadedModel
from .metrics import Metrics
from .pooling import DTYPES
from .settings import ModelConfig, Settings, batch_limit
from .sources import build_model
from .trace_gate import forwarding

# Logged under the worker's name, as before loading had a module of its own: log filters and
# the JSON lines' "logger" field stay the same.
log = logging.getLogger("layertap.server.worker")

# A model whose batch forward takes less than this is not timed for channels-last.
SMALL_FORWARD_MS = 20.0


def _forward_ms(module: torch.nn.Module, x: torch.Tensor, runs: int = 3) -> float:
    """Median ms of `runs` forwards after one untimed (allocator, kernel choice); the caller
    sets the compute mode."""

    def forward() -> None:
        with forwarding():
            module(x)

    return auto_compile.timed_ms(forward, lambda: None, runs)


def _import_all(specs: Sequence[str]) -> list[Any]:
    return [model_loading.import_object(s) for s in specs]


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
                self._built[key] = build_model(cfg)
            built = self._built[key]
        return dataclasses.replace(built, module=copy.deepcopy(built.module)).for_entry(cfg)

    def clear(self) -> None:
        with self._lock:
            self._built.clear()


class ModelLoader:
    """Loads entries onto one device. Entries with the same base model (architecture, weights,
    channels_last) share its device copy, and its layout is decided once."""

    def __init__(
        self,
        settings: Settings,
        device: torch.device,
        metrics: Metrics | None = None,
        shared: SharedWeights | None = None,
    ) -> None:
        self.settings = settings
        self.device = device
        self.metrics = metrics
        self.shared = shared
        self._bases: dict[tuple[object, ...], model_loading.LoadedWeights] = {}
        self._layouts: dict[tuple[object, ...], bool] = {}  # base key -> channels-last

    def _extractor(self, loaded: LoadedModel, nodes: tuple[str, ...]) -> torch.nn.Module:
        """A warm-up build into the model's cache (not a hit or miss: no request waited)."""
        return cached_extractor(
            loaded, nodes, self.settings.extractor_cache_size, self.metrics, warm_up=True
        )

    def _autocast_dtype(self, cfg: ModelConfig) -> torch.dtype | None:
        if not cfg.autocast:
            return None
        if cfg.autocast == "float16" and self.device.type != "cuda":
            raise model_loading.ModelLoadError(
                f"model {cfg.name!r}: autocast = 'float16' needs a CUDA device (this worker "
                f"runs on {self.device}); use 'bfloat16' on CPU, or leave autocast empty"
            )
        return DTYPES[cfg.autocast]

    def load(self, cfg: ModelConfig) -> LoadedModel:
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
                loaded = build_model(cfg)
            module = loaded.module.to(self.device)
            if cfg.channels_last:
                module = module.to(memory_format=torch.channels_last)
            loaded.module = module.eval()
            self._bases[key] = loaded
        if cfg.submodule:  # the base (whole model) stays shared; this entry serves a part
            loaded = dataclasses.replace(loaded, module=_submodule(cfg, loaded.module))
        module = loaded.module
        catalog = self._catalog(cfg, module, loaded.preprocessing.crop_size, loaded)
        module.eval()
        described = loaded.prefix_tokens
        if cfg.prefix_tokens >= 0:
            n_prefix = cfg.prefix_tokens
        elif described is not None and described >= 0:
            n_prefix = described
        else:
            n_prefix = default_prefix_tokens(module)
        result = LoadedModel(cfg, loaded, catalog, module_tree(module), n_prefix, autocast=autocast)
        if key not in self._layouts:  # decided once per base model
            self._layouts[key] = self._pick_channels_last(result)
        result.channels_last = self._layouts[key]
        auto_compile.choose(result, self.device, self.settings, self._extractor)
        self._warm_up(result)
        if self.metrics is not None:
            self.metrics.compile_seconds.labels(cfg.name).inc(result.compile_seconds)
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
        if (
            self.device.type != "cpu"
            or cfg.submodule
            or cfg.explicit_compile  # "auto" is decided after the layout
            or not loaded.catalog.nodes
        ):
            return False
        if not self.settings.warmup:  # no forward at load was asked for: nothing is timed
            return False
        dims = [p.dim() for p in module.parameters()]
        if 5 in dims:
            return False
        if dims.count(4) <= 1:  # a transformer's patch embedding at most: nothing to speed up
            return False
        extractor = self._extractor(loaded, (loaded.catalog.nodes[-1].name,))
        # at the batch size this model will mostly run (channels-last gains grow with it)
        batch = batch_limit(self.settings, cfg, self.device.type)
        x = torch.zeros(min(8, batch), 3, *loaded.catalog.input_size, device=self.device)
        layouts = (torch.contiguous_format, torch.channels_last)
        times: dict[torch.memory_format, list[float]] = {f: [] for f in layouts}

        def timed(inputs: torch.Tensor, runs: int = 3) -> float:
            with compute_mode(loaded, self.device):  # as requests run it (autocast included)
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
        self,
        cfg: ModelConfig,
        module: torch.nn.Module,
        input_size: tuple[int, int],
        built: model_loading.LoadedWeights,
    ) -> Catalog:
        """The node catalogue in the entry's extraction mode: fx ("fx"; "auto" first) or forward
        hooks ("hooks"; "auto" when tracing fails, with the trace error as the reason). The
        tracer keeps the model library's own leaves and wrapped functions (`built`), then the
        entry's."""
        if cfg.extraction == "hooks":
            reason = "configured: extraction = 'hooks'"
        else:
            try:
                catalog = build_catalog(
                    module,
                    input_size,
                    leaf_modules=[*built.leaf_modules, *_import_all(cfg.leaf_modules)],
                    autowrap_functions=[
                        *built.autowrap_functions,
                        *_import_all(cfg.autowrap_functions),
                    ],
                    map_layout=built.map_layout,
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
                note = f"{built.trace_note}; " if built.trace_note else ""
                reason = (
                    f"{note}torch.fx cannot trace it ({error}); serving module outputs through "
                    "hooks"
                )
                log.warning("model %s: %s", cfg.name, reason)
            else:
                catalog.reason = (
                    "configured: extraction = 'fx'"
                    if cfg.extraction == "fx"
                    else "torch.fx traced the eval graph (extraction = 'auto')"
                )
                return catalog
        if cfg.explicit_compile:
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
            extractor = self._extractor(loaded, nodes)
            for size in cfg.warmup_batch_sizes:
                batch = torch.zeros(size, 3, h, w, device=self.device)
                run_extractor(loaded, extractor, batch, self.device)
