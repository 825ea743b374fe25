"""The decode pool, shared fairly: at most `slots` functions run on the executor at once, and the
next one is taken round-robin between clients (server/fairness.py), so one client's hundreds of
queued decodes never sit in front of another client's one. Pure asyncio on the event loop;
constant work per call.

Without it the executor's own FIFO queue decided: a flooding client's backlog (up to its share of
the batch queue, all being decoded) delayed every other client's decode by that backlog.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from .errors import Unavailable
from .fairness import CLIENT

_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class FairPool:
    """Runs functions on `executor` for the calling task's client (fairness.CLIENT)."""

    def __init__(self, executor: Executor, slots: int) -> None:
        self.executor = executor
        self.slots = max(1, slots)
        self.running = 0
        # client -> its waiting jobs; the first key is the next to be served
        self._waiting: OrderedDict[str, deque[_Job]] = OrderedDict()

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the executor, once this client's turn comes; cancelling the caller
        before then drops the job (it never runs)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        client = CLIENT.get().key
        jobs = self._waiting.get(client)
        if jobs is None:  # a client with nothing waiting goes next: it had no turn to wait for
            jobs = self._waiting[client] = deque()
            self._waiting.move_to_end(client, last=False)
        jobs.append((fn, args, future))
        self._pump()
        return await future

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self.running < self.slots and self._waiting:
            client, jobs = self._waiting.popitem(last=False)
            fn, args, future = jobs.popleft()
            if jobs:
                self._waiting[client] = jobs  # to the back: the next client goes first
            if future.done():  # its caller gave up
                continue
            try:
                started = loop.run_in_executor(self.executor, fn, *args)
            except RuntimeError:  # the executor was shut down: the server is stopping
                future.set_exception(Unavailable("server is shutting down"))
                continue
            self.running += 1
            started.add_done_callback(functools.partial(self._finished, future))

    def _finished(self, future: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
        self.running -= 1
        if not future.done():
            if done.cancelled():
                future.cancel()
            elif (exc := done.exception()) is not None:
                future.set_exception(exc)
            else:
                future.set_result(done.result())
        self._pump()
