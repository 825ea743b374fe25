"""A loaded model's extractors: built once per node set (BatchNorm folded, compiled), kept in the
model's LRU, and run in its compute mode.

Worker thread only: building and running happen on the device's one worker thread, so a build
for a new node set happens once even when many requests ask at once, and no tracing (or
torch.compile) can race a forward.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from .catalog import build_extractor
from .fusion import fold_batchnorms
from .hooks import build_hook_extractor
from .loaded import LoadedModel
from .metrics import Metrics
from .trace_gate import forwarding


def cached_extractor(
    loaded: LoadedModel,
    nodes: tuple[str, ...],
    max_entries: int,
    metrics: Metrics | None,
    warm_up: bool = False,
) -> torch.nn.Module:
    """The extractor of `nodes` from the model's cache (most recently used last), built on a
    miss; past `max_entries` the least recently used ones are dropped. Warm-up builds are not
    counted as hits or misses: no request waited for them."""
    cache = loaded.extractors
    name = loaded.config.name
    m = metrics
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
    while len(cache) > max_entries:
        cache.popitem(last=False)
        evicted += 1
    if m is not None:
        if not warm_up:
            m.cache_misses.labels(name).inc()
        m.build_seconds.labels(name).observe(time.perf_counter() - started)
        m.cache_evictions.labels(name).inc(evicted)
        m.cache_entries.labels(name).set(len(cache))
    return extractor


@contextlib.contextmanager
def compute_mode(loaded: LoadedModel, device: torch.device) -> Iterator[None]:
    """inference_mode (thread-local: entered here, on the worker), plus autocast."""
    with torch.inference_mode():
        if loaded.autocast is None:
            yield
        else:
            with torch.autocast(device.type, dtype=loaded.autocast):
                yield


def run_extractor(
    loaded: LoadedModel, extractor: torch.nn.Module, batch: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    """One forward of `extractor` on `batch` (already on `device`), as requests run it."""
    if loaded.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    loaded.weights.module.eval()  # nothing may have flipped it, but BatchNorm must be eval
    extractor.eval()
    with forwarding(), compute_mode(loaded, device):
        return extractor(batch)  # type: ignore[no-any-return]
