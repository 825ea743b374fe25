"""A loaded model's extractors: built once per node set (BatchNorm folded, compiled), kept in the
model's cache, and run in its compute mode.

The cache keeps the node sets used most, not the ones used last (plain LRU let a client cycling
through more node sets than the cache holds evict everyone's and rebuild on every batch): each
node set's uses are counted (also for sets not cached, up to GHOSTS x the cache size), halved
every AGE_EVERY x size uses so that old habits fade, and when the cache is full the set with the
fewest uses leaves, the least recent among equals. A new set that is used less than everything
cached is built for its batch but not kept; used again, it earns its place (TinyLFU's admission,
Einziger et al. 2017, in its simplest form).

Worker thread only: building and running happen on the device's one worker thread, so a build
for a new node set happens once even when many requests ask at once, and no tracing (or
torch.compile) can race a forward.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
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
    miss; past `max_entries` the least used ones leave (module docstring). Warm-up builds are
    not counted as hits or misses: no request waited for them."""
    cache = loaded.extractors
    name = loaded.config.name
    m = metrics
    _count_use(loaded.extractor_uses, nodes, max_entries)
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
    if cfg.explicit_compile and loaded.catalog.mode == "fx":
        # compiled lazily by its first call, on this thread (torch.compile is not
        # thread-safe); each new batch size compiles again, hence warmup_batch_sizes
        options: dict[str, Any] = {"backend": cfg.compile_backend}
        if cfg.compile_backend == "inductor" and cfg.compile != "default":
            options["mode"] = cfg.compile
        extractor = torch.compile(extractor, **options)  # type: ignore[assignment]
    elif loaded.compile_job is not None and loaded.catalog.mode == "fx":
        extractor = loaded.compile_job(extractor)  # compile = "auto" chose compiled
    cache[nodes] = extractor
    evicted = 0
    uses = loaded.extractor_uses
    while len(cache) > max_entries:
        # fewest uses first; min keeps the first of equals, and the cache is least recent first
        coldest = min(cache, key=lambda key: uses.get(key, 0))
        del cache[coldest]
        evicted += coldest != nodes  # a set not kept is not an eviction
    if m is not None:
        if not warm_up:
            m.cache_misses.labels(name).inc()
        m.build_seconds.labels(name).observe(time.perf_counter() - started)
        m.cache_evictions.labels(name).inc(evicted)
        m.cache_entries.labels(name).set(len(cache))
    return extractor


GHOSTS = 4  # node sets whose uses are remembered: this many times the cache's size
AGE_EVERY = 8  # all counts are halved after this many times the cache's size of uses


def _count_use(uses: dict[tuple[str, ...], int], nodes: tuple[str, ...], size: int) -> None:
    uses[nodes] = uses.get(nodes, 0) + 1
    total = uses.get((), 0) + 1  # () is never a node set: it keeps the running total
    if total >= AGE_EVERY * size or len(uses) > GHOSTS * size + 1:
        halved = {k: v // 2 for k, v in uses.items() if k and v // 2}
        uses.clear()
        uses.update(halved)
        total = 0
    uses[()] = total


def is_cached(loaded: LoadedModel, nodes: Sequence[str]) -> bool:
    """Whether a batch of `nodes` alone would find its extractor built (read from the event
    loop: a dict lookup, safe while the worker changes the cache)."""
    return loaded.catalog.in_order(nodes) in loaded.extractors


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
