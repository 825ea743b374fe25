"""Process-wide settings `layertap serve` applies before it serves (in-process servers built by
tests or embedders leave their host process alone).

Both exist because of what a CPU forward costs when it runs on a worker thread of a busy server
rather than on the main thread of a benchmark loop (measured on the 2-core CPU, mobilenet_v2;
docs/BENCHMARKS.md):

- glibc's malloc returns freed activation memory to the OS between forwards (blocks above the
  dynamic mmap threshold are unmapped on free, a thread arena's free top is trimmed, and its
  emptied 64 MiB heaps are unmapped), so every batch page-faults its activations back in.
  Fixed thresholds and a top pad keep that memory for the next forward: a worker thread's
  batch-4 forward went from ~59 ms to ~38 ms, batch 1 from ~16 to ~13 ms
  (bench/worker_forward.py); in the server, a sequential client's batches of 4 from ~49 to
  ~44 ms more with the top pad. The price: the process keeps its high-water mark of freed
  memory (what it already needed at its peak) instead of shrinking after a burst.
- With libgomp every thread that once ran a multi-threaded torch op keeps an OpenMP team for
  good; once the process holds more team threads than cores, libgomp stops spinning at
  barriers and every layer of every forward pays a futex sleep and wake (a worker thread's
  batch-1 forward: 21 ms → 57 ms after one 2-thread op on the main thread). The event loop's
  thread therefore runs torch single-threaded (it should not run torch at all); only the model
  workers hold teams.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch

__all__ = [
    "MMAP_THRESHOLD",
    "TOP_PAD",
    "TRIM_THRESHOLD",
    "keep_freed_memory",
    "pin_torch_threads",
    "single_threaded_main",
]

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 128 << 20  # above a thread heap's 64 MiB: glibc then never unmaps an emptied heap


def keep_freed_memory() -> bool:
    """Fixed glibc malloc thresholds: blocks under 32 MiB come from the heap (not fresh mmaps),
    the heap's free top is kept up to 1 GiB, and a 128 MiB top pad keeps thread arenas' heaps
    mapped once emptied (the pad is address space; pages are only resident once used). Setting
    the thresholds also turns off glibc's dynamic ones. Returns False (and changes nothing)
    where the C library has no mallopt (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.info("malloc tuning skipped: this C library has no mallopt")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    ok = mallopt(_M_TOP_PAD, TOP_PAD) == 1 and ok
    if not ok:
        log.warning("malloc tuning: mallopt refused the thresholds")
    return ok


def pin_torch_threads(n: int) -> None:
    """torch intra-op threads for the calling thread, for good. ATen initialises a thread's
    count lazily, at its first parallel op, from the process-wide value the *last*
    set_num_threads call left (any thread's); asking for the count right away makes that
    first initialisation happen now, with our value, so later calls on other threads (a
    decode thread setting 1, a worker setting 2) cannot change this thread's count."""
    torch.set_num_threads(n)
    torch.get_num_threads()


def single_threaded_main() -> None:
    """torch single-threaded on the calling (event loop) thread: no OpenMP team there."""
    pin_torch_threads(1)
