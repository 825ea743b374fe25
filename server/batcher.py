"""Micro-batching: pure asyncio, knows futures and keys, never torch or protobuf.

Items with the same key (same extractor and input shape) from concurrent requests are stacked
into one call of `run_batch`. The rule (after ray serve's batching and Triton's dynamic batcher):

- Within a priority class, clients share the worker by weighted fair queuing
  (server/fairness.py): every item carries its client's finish tag, and smaller tags go first.
  With one client that is arrival order. The next batch's head is the NORMAL item with the
  smallest tag when any waits, else the LOW one. A LOW item that has waited
  `low_priority_max_wait_s` counts as NORMAL (no starvation).
- One client may hold at most `client_share` of `max_queue` (queued, reserved or computing);
  past it that client waits up to `client_wait_s`, then gets RESOURCE_EXHAUSTED (retryable),
  while the others keep their room (server/queue_room.py).
- If the worker was idle and nothing else was queued when the head arrived, it runs at once (a
  lone request never waits). Otherwise the batch stays open until it holds
  `preferred_batch_size` items (0: `max_batch_size`) or `max_wait` has passed since the head
  arrived, whichever comes first.
- Companions (`companion_wait_s`, off when 0): the clients a batch just answered are likely
  to send again at once (closed loops: every client awaiting its answer before the next call).
  So for a short window after a batch of key K ends, at most `companion_wait_s` and
  COMPANION_WAIT_FRACTION of that batch's run time, the next batch of K waits until it holds
  as many items as were queued when the batch ended plus the batch's own size (capped at the
  target). A request after a batch of one, or after the window, is lone and never waits;
  without this, four closed-loop clients split into two batches of two for good.
- The batch then takes up to `max_batch_size` items of the head's key: NORMAL ones first, then
  LOW ones, each smallest tag first.

Every time here is the event loop's clock, `loop.time()` (what asyncio's timers use, and
time.monotonic() in CPython's loops), so the rule is tested under a virtual clock.

Cancelled items are dropped before running and reported to `on_drop` as "cancelled", or as
"deadline" when their request's deadline had passed. Whatever happens in `run_batch`, every
waiting future gets a result or an exception: none is left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .batching import (
    NORMAL,
    REQUEST_DEADLINE,
    BatchInfo,
    BatchPolicy,
    RunBatch,
    clock,
    is_deadline,
)
from .errors import Unavailable
from .fairness import CLIENT, FairTags
from .queue_room import QueueRoom

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


# The companion window is at most this share of the batch's run time: if the companions do
# not come, the worker idles for no more than 30 % of one forward.
COMPANION_WAIT_FRACTION = 0.3


@dataclass(eq=False)
class _Item(Generic[P]):
    key: Hashable
    payload: P
    future: asyncio.Future[tuple[Any, BatchInfo]]
    enqueued: float
    lone: bool  # arrived to an idle worker with nothing queued
    policy: BatchPolicy
    priority: int = NORMAL  # 0 normal, 1 low (bulk)
    deadline: float | None = None  # clock() after which the client no longer waits
    running: bool = False  # handed to run_batch: a cancel now is not a drop
    client: str = ""  # fairness.Client.key
    tag: float = 0.0  # weighted fair queuing finish tag: smaller goes first


@dataclass(frozen=True)
class _LastBatch:
    """The batch that ran last: whose clients may be about to send again."""

    key: Hashable
    size: int
    queued: int  # items of its key already waiting when it ended
    ended: float
    run_s: float


@dataclass
class Batcher:
    """One batcher per device worker: batches run one at a time."""

    run_batch: RunBatch
    max_batch_size: int = 8
    max_wait_s: float = 0.002
    max_queue: int = 512
    preferred_batch_size: int = 0
    # per-key policy (per-model limits, waits, preferred sizes); overrides the three above
    policy: Callable[[Hashable], BatchPolicy] | None = None
    low_priority_max_wait_s: float = 1.0
    # after a batch, how long (at most) its key's next batch waits for that batch's clients to
    # send again; 0: never (module docstring)
    companion_wait_s: float = 0.0
    # maps (submitted key, payload) to the batch key, e.g. to keep node sets apart
    group_key: Callable[[Hashable, Any], Hashable] | None = None
    name: str = ""  # reported in BatchInfo.device
    # the share of max_queue one client may hold (1: no per-client bound), and how long a
    # client past it waits for room before it is refused
    client_share: float = 1.0
    client_wait_s: float = 0.0
    # an item's cost for fair queuing (1: one image at the reference size)
    cost: Callable[[Any], float] | None = None
    # observers (metrics): queue depth after every change, size of every batch run,
    # each item dropped before compute ("cancelled" or "deadline")
    on_queue_depth: Callable[[int], None] | None = None
    on_batch: Callable[[Hashable, int], None] | None = None
    on_drop: Callable[[Hashable, str], None] | None = None
    _pending: list[_Item[Any]] = field(default_factory=list, init=False)
    _wakeup: asyncio.Event | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _running: int = field(default=0, init=False)  # items of the batch being computed
    _closed: bool = field(default=False, init=False)
    _last: _LastBatch | None = field(default=None, init=False)
    _tags: FairTags = field(default_factory=FairTags, init=False)
    _room: QueueRoom = field(init=False)  # the queue's bound and each client's share
    batches_run: int = field(default=0, init=False)
    dropped: dict[str, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._room = QueueRoom(self.max_queue, self.client_share, self.client_wait_s)

    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def devices(self) -> list[str]:
        return [self.name] if self.name else []

    @property
    def _busy(self) -> bool:
        """A batch is being computed."""
        return self._running > 0

    @property
    def waiting(self) -> int:
        """Images queued or holding reserved room: what max_queue bounds."""
        return len(self._pending) + self._room.reserved

    @property
    def load(self) -> int:
        """Images this batcher owes: queued, reserved (being decoded) and computing."""
        return len(self._pending) + self._room.reserved + self._running

    @contextlib.contextmanager
    def reserve(self, count: int) -> Iterator[None]:
        """Hold queue room for `count` items while they are being decoded, so a full queue
        refuses a request before any decoding is spent on it (and decode backlog stays bounded).
        Submit inside the block with `reserved=True`. Await `admit` first to give a client past
        its share its wait (server/queue_room.py)."""
        client = CLIENT.get().key
        self._check_room(count, client)
        self._room.reserved += count
        self._room.hold(client, count)
        try:
            yield
        finally:
            self._room.reserved -= count
            self._room.hold(client, -count)

    async def admit(self, count: int) -> None:
        """Wait until the calling client has room for `count` items, at most client_wait_s."""
        await self._room.admit(count, CLIENT.get().key, lambda: self.waiting)

    def _check_room(self, count: int, client: str) -> None:
        if self._closed:
            raise Unavailable("server is shutting down; retry on another replica")
        self._room.check(count, client, self.waiting)

    def _policy_for(self, key: Hashable) -> BatchPolicy:
        if self.policy is not None:
            p = self.policy(key)
        else:
            p = BatchPolicy(self.max_batch_size, self.preferred_batch_size, self.max_wait_s)
        return BatchPolicy(max(1, p.max_batch_size), max(0, p.preferred_batch_size), p.max_wait_s)

    def submit_many(
        self,
        key: Hashable,
        payloads: Sequence[Any],
        reserved: bool = False,
        priority: int = NORMAL,
        deadline: float | None = None,
    ) -> list[asyncio.Future[Any]]:
        """Queue all payloads of one request atomically, or refuse them all (RESOURCE_EXHAUSTED).
        `reserved`: the room was already taken with `reserve()` (inside its block).
        `deadline`: clock() at which the client stops waiting (tells a dropped item's deadline
        from its client's cancel); default: set_request_deadline's, if any."""
        if deadline is None:
            deadline = REQUEST_DEADLINE.get()
        client = CLIENT.get()
        if not reserved:
            self._check_room(len(payloads), client.key)
        elif self._closed:
            raise Unavailable("server is shutting down; retry on another replica")
        self.start()
        loop = asyncio.get_running_loop()
        enqueued = loop.time()
        lone = not self._busy and not self._pending
        futures = []
        policies: dict[Hashable, BatchPolicy] = {}
        for payload in payloads:
            k = self.group_key(key, payload) if self.group_key is not None else key
            if k not in policies:
                policies[k] = self._policy_for(k)
            fut: asyncio.Future[Any] = loop.create_future()
            cost = self.cost(payload) if self.cost is not None else 1.0
            tag = self._tags.tag(client, cost)
            item = _Item(k, payload, fut, enqueued, lone, policies[k], priority, deadline)
            item.client, item.tag = client.key, tag
            self._room.hold(client.key, 1)
            fut.add_done_callback(functools.partial(self._on_done, item))
            self._pending.append(item)
            futures.append(fut)
        assert self._wakeup is not None
        self._wakeup.set()
        self._report_depth()
        return futures

    def _on_done(self, item: _Item[Any], _future: asyncio.Future[Any]) -> None:
        """Give the item's room back to its client; count it if its client stopped waiting
        before its batch ran."""
        self._room.hold(item.client, -1)
        if item.running or not item.future.cancelled():
            return
        reason = "cancelled"
        if item.deadline is not None and is_deadline(clock(), item.deadline, item.enqueued):
            reason = "deadline"
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if self.on_drop is not None:
            self.on_drop(item.key, reason)

    def _report_depth(self) -> None:
        if self.on_queue_depth is not None:
            self.on_queue_depth(len(self._pending))

    async def submit(
        self, key: Hashable, payload: Any, priority: int = NORMAL
    ) -> tuple[Any, BatchInfo]:
        return await self.submit_many(key, [payload], priority=priority)[0]

    def _is_low(self, item: _Item[Any], now: float) -> bool:
        """LOW until it has waited low_priority_max_wait_s; then it counts as NORMAL."""
        return item.priority != NORMAL and now - item.enqueued < self.low_priority_max_wait_s

    def _head(self, now: float) -> _Item[Any]:
        """The NORMAL item with the smallest fair-queuing tag, else the LOW one."""
        return min(self._pending, key=lambda i: (self._is_low(i, now), i.tag))

    def _take(self, key: Hashable, limit: int) -> list[_Item[Any]]:
        """Remove and return up to `limit` live items of `key`: NORMAL first, then LOW, each
        oldest first."""
        at = clock()
        candidates = [i for i in self._pending if i.key == key and not i.future.done()]
        candidates.sort(key=lambda i: (self._is_low(i, at), i.tag))
        batch = candidates[:limit]
        taken = {id(i) for i in batch}
        self._pending = [i for i in self._pending if id(i) not in taken]
        self._tags.served(i.tag for i in batch)
        return batch

    def _count(self, key: Hashable) -> int:
        return sum(1 for i in self._pending if i.key == key and not i.future.done())

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            self._pending = [i for i in self._pending if not i.future.done()]
            if not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._head(clock())
            policy = head.policy
            # everything queued would fit in this one batch: nothing to wait for
            alone = len(self._pending) <= policy.max_batch_size and all(
                i.key == head.key for i in self._pending
            )
            target, deadline = policy.target, head.enqueued + policy.max_wait_s
            companions = self._companions(head.key, policy)
            if companions is not None:
                target, deadline = companions
            if companions is not None or not (head.lone and alone):
                while self._count(head.key) < target and not self._closed:
                    remaining = deadline - clock()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
            batch = self._take(head.key, policy.max_batch_size)
            if batch:
                await self._run(head.key, batch)

    def _companions(self, key: Hashable, policy: BatchPolicy) -> tuple[int, float] | None:
        """(size to wait for, until when) while the last batch's clients may still send
        again; None when that does not apply (module docstring)."""
        last = self._last
        if self.companion_wait_s <= 0 or last is None or last.key != key:
            return None
        target = min(policy.target, last.queued + last.size)
        window = min(self.companion_wait_s, COMPANION_WAIT_FRACTION * last.run_s)
        deadline = last.ended + window
        if self._count(key) >= target or clock() >= deadline:
            return None
        return target, deadline

    async def _run(self, key: Hashable, batch: list[_Item[Any]]) -> None:
        for item in batch:
            item.running = True
        self._running = len(batch)
        self._report_depth()
        if self.on_batch is not None:
            self.on_batch(key, len(batch))
        started = clock()
        try:
            results = await self.run_batch(key, [i.payload for i in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"run_batch returned {len(results)} results for {len(batch)} items"
                )
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(Unavailable("server is shutting down"))
            raise
        except BaseException as exc:  # every waiting future must hear about it
            log.debug("batch of %d failed: %r", len(batch), exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._running = 0
            self.batches_run += 1
            ended = clock()
            self._last = _LastBatch(key, len(batch), self._count(key), ended, ended - started)
        run_s = ended - started
        batch_id = self.batches_run
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                info = BatchInfo(started - item.enqueued, run_s, len(batch), batch_id, self.name)
                item.future.set_result((result, info))

    async def close(self, drain: bool = True) -> None:
        """Stop taking work; with drain, queued items still run, else they fail UNAVAILABLE."""
        self._closed = True
        if not drain:
            for item in self._pending:
                if not item.future.done():
                    item.future.set_exception(Unavailable("server is shutting down"))
            self._pending.clear()
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
