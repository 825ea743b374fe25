"""Several devices behind the one batcher interface the servicer uses: pure asyncio.

Each device has its own worker thread, model copy and Batcher; the Dispatcher sends each request
to the device that owes the fewest images (queued + reserved for decoding + computing), so a
slow or busy device gets less. `reserve()` picks the device and `submit_many(reserved=True)` in
the same task goes to that same device (a context variable carries the choice), so a request's
images stay together and its queue room is held where they will run.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .batcher import Batcher
from .batching import NORMAL, BatchInfo

_lane: contextvars.ContextVar[Batcher | None] = contextvars.ContextVar("lane", default=None)


@dataclass
class Dispatcher:
    """Batcher-compatible front of one batcher per device (reserve / submit_many / queued /
    close ...), least-loaded first; ties go to the first device listed."""

    batchers: Sequence[Batcher]

    def start(self) -> None:
        for b in self.batchers:
            b.start()

    @property
    def queued(self) -> int:
        return sum(b.queued for b in self.batchers)

    @property
    def devices(self) -> list[str]:
        return [name for b in self.batchers for name in b.devices]

    @property
    def load(self) -> int:
        return sum(b.load for b in self.batchers)

    @property
    def batches_run(self) -> int:
        return sum(b.batches_run for b in self.batchers)

    @property
    def dropped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for b in self.batchers:
            for reason, count in b.dropped.items():
                total[reason] = total.get(reason, 0) + count
        return total

    def pick(self, count: int = 0) -> Batcher:
        """The least-loaded batcher with room for `count` more images (else the least loaded,
        whose refusal names the limit)."""
        ordered = sorted(self.batchers, key=lambda b: b.load)  # stable: ties keep list order
        for b in ordered:
            if b.waiting + count <= b.max_queue:
                return b
        return ordered[0]

    async def admit(self, count: int) -> None:
        """The calling client's wait for room on the device it would get now."""
        await self.pick(count).admit(count)

    @contextlib.contextmanager
    def reserve(self, count: int) -> Iterator[None]:
        """Hold room on the chosen device; submits inside the block (same task) go there."""
        lane = self.pick(count)
        with lane.reserve(count):
            token = _lane.set(lane)
            try:
                yield
            finally:
                _lane.reset(token)

    def submit_many(
        self,
        key: Hashable,
        payloads: Sequence[Any],
        reserved: bool = False,
        priority: int = NORMAL,
        deadline: float | None = None,
    ) -> list[asyncio.Future[Any]]:
        lane = _lane.get() if reserved else None
        if lane is None:
            lane, reserved = self.pick(len(payloads)), False
        return lane.submit_many(
            key, payloads, reserved=reserved, priority=priority, deadline=deadline
        )

    async def submit(
        self, key: Hashable, payload: Any, priority: int = NORMAL
    ) -> tuple[Any, BatchInfo]:
        return await self.submit_many(key, [payload], priority=priority)[0]

    async def close(self, drain: bool = True) -> None:
        await asyncio.gather(*(b.close(drain) for b in self.batchers))
