"""Reading ahead, in order: a small thread pool reads the next items of a lazy stream while
the current ones are sent, so a slow object store (or disk) is overlapped with extraction,
and memory holds at most ``ahead`` items' bytes whatever the stream's length.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(
    items: Iterable[T], read: Callable[[T], R], *, threads: int, ahead: int
) -> Iterator[tuple[T, R | Exception]]:
    """``(item, read(item))`` for every item, in the order of ``items``; an item whose read
    raised comes with the exception (the run goes on). At most ``ahead`` reads are started
    and not yet handed out; ``items`` is advanced only as room frees, in the consumer's
    thread. ``threads`` 0 (or ``ahead`` 0): read in the consumer's thread, one at a time."""
    if threads < 1 or ahead < 1:
        for item in items:
            yield item, _call(read, item)
        return
    pool = ThreadPoolExecutor(max_workers=min(threads, ahead), thread_name_prefix="layertap-read")
    window: deque[tuple[T, Future[R | Exception]]] = deque()
    try:
        for item in items:
            window.append((item, pool.submit(_call, read, item)))
            if len(window) >= ahead:
                first, future = window.popleft()
                yield first, future.result()
        while window:
            first, future = window.popleft()
            yield first, future.result()
    finally:
        # Stopped early (an error, Ctrl-C, a closed generator): drop the reads not started.
        pool.shutdown(wait=False, cancel_futures=True)


def _call(read: Callable[[T], R], item: T) -> R | Exception:
    try:
        return read(item)
    except Exception as exc:  # handed to the consumer with its item
        return exc
