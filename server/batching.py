"""The batching vocabulary the stages share: how a key batches (BatchPolicy), how an item was
served (BatchInfo), what the pipeline needs of a batcher (BatchQueue), priorities, and each
request's deadline on the batcher's clock (the event loop's, so tests run on virtual time).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

RunBatch = Callable[[Hashable, list[Any]], Awaitable[Sequence[Any]]]

NORMAL = 0
LOW = 1
# A cancel this close to the request's deadline is the deadline: the client's own timer fires
# first and its cancel reaches us before our timer does, because the client started counting
# before it sent the call and we count from when its headers arrived (and gRPC may round the
# timeout it sends up). Measured on loopback under load: the cancel came 6-11 ms early for a
# 1 s timeout. The larger of the two counts: a fixed 50 ms, or 2 % of the request's timeout.
DEADLINE_SLACK_S = 0.05
DEADLINE_SLACK_FRACTION = 0.02


def is_deadline(now: float, deadline: float, since: float) -> bool:
    """Whether a cancel at `now` of an item submitted at `since` is its request's deadline."""
    slack = max(DEADLINE_SLACK_S, DEADLINE_SLACK_FRACTION * (deadline - since))
    return now >= deadline - slack


def clock() -> float:
    """The batcher's clock: the running event loop's (module docstring)."""
    return asyncio.get_running_loop().time()


# When the client of the RPC this task serves stops waiting (clock()), if it said.
REQUEST_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "request_deadline", default=None
)


def set_request_deadline(time_remaining: float | None) -> None:
    """Record for the current task (one RPC) when its client stops waiting; `time_remaining`
    is gRPC's `context.time_remaining()` (None: no deadline). Items the task submits carry it,
    so a dropped item can be told apart: its deadline passed, or its client cancelled."""
    deadline = None if time_remaining is None else clock() + time_remaining
    REQUEST_DEADLINE.set(deadline)


@dataclass(frozen=True)
class BatchPolicy:
    """How one key batches: at most `max_batch_size` items; stop waiting for more once
    `preferred_batch_size` are queued (0: only a full batch stops the wait) or `max_wait_s`
    after the head arrived."""

    max_batch_size: int
    preferred_batch_size: int = 0
    max_wait_s: float = 0.002

    @property
    def target(self) -> int:
        """The size at which a collecting batch stops waiting."""
        preferred = self.preferred_batch_size
        return min(preferred, self.max_batch_size) if preferred > 0 else self.max_batch_size


@dataclass(frozen=True)
class BatchInfo:
    """How an item was served: time queued, the batch's run time, the batch size, and the
    batcher (device) that ran it."""

    queue_s: float
    run_s: float
    batch_size: int
    batch_id: int = 0
    device: str = ""


class BatchQueue(Protocol):
    """What the servicer needs of a batcher: one Batcher, or a Dispatcher over several."""

    @property
    def queued(self) -> int: ...

    @property
    def devices(self) -> list[str]:
        """The names of the device workers behind it (what BatchInfo.device reports)."""
        ...

    async def admit(self, count: int) -> None:
        """Wait (bounded) until the calling client may hold `count` more items."""
        ...

    def reserve(self, count: int) -> contextlib.AbstractContextManager[None]: ...

    def submit_many(
        self,
        key: Hashable,
        payloads: Sequence[Any],
        reserved: bool = False,
        priority: int = NORMAL,
        deadline: float | None = None,
    ) -> list[asyncio.Future[Any]]: ...

    async def close(self, drain: bool = True) -> None: ...
