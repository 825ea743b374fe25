"""Room in one batcher's queue: the whole queue's bound, and each client's share of it.

Counts images (TTA views included) queued, reserved while being decoded, or, for the client
share, still running. A client may always hold its share; while the others hold little it may
hold more, up to the queue less one share, which stays free for a client that arrives (so a
lone bulk client keeps the worker busy, and a newcomer still finds room). A request that can
never fit is LimitExceeded (not retryable); a full queue is QueueFull at once (retryable). A
client past what it may hold first waits, up to `client_wait_s`, for its own earlier images to
finish (unless the whole queue is full: then it is refused at once like everyone), and only
then gets QueueFull: refusing at once let a flooding client that retries without pause turn its
share into thousands of refusals a second, whose handling took the CPU from everyone else's
forwards; a waiting call costs nothing but its slot (and its connection's stream limit bounds
those). Pure asyncio; constant work per call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import LimitExceeded, QueueFull


@dataclass
class QueueRoom:
    max_queue: int
    client_share: float = 1.0  # of max_queue; 1: no per-client bound
    client_wait_s: float = 0.0
    reserved: int = 0
    _held: dict[str, int] = field(default_factory=dict)
    _total: int = 0  # the sum of _held
    _waiters: dict[str, deque[asyncio.Future[None]]] = field(default_factory=dict)

    @property
    def client_limit(self) -> int:
        """The images one client may always hold (client_share of max_queue, at least 1)."""
        return max(1, int(self.max_queue * min(1.0, self.client_share)))

    @property
    def ceiling(self) -> int:
        """The most one client may ever hold: the queue less one share kept for newcomers."""
        return max(self.client_limit, self.max_queue - self.client_limit)

    def limit_now(self, client: str) -> int:
        """What `client` may hold now: its share, or more while the others hold little (the
        queue less their images and one share kept free for a client that arrives)."""
        others = self._total - self.held(client)
        return max(self.client_limit, self.ceiling - others)

    def held(self, client: str) -> int:
        return self._held.get(client, 0)

    def hold(self, client: str, count: int) -> None:
        """Count `count` more (or, negative, fewer) images of `client`; wake its next waiter
        when room came back."""
        held = self._held.get(client, 0) + count
        self._total += count
        if held > 0:
            self._held[client] = held
        else:
            self._held.pop(client, None)
        if count < 0:
            self._pass_on(client)

    def _fits_client(self, count: int, client: str) -> bool:
        return self.client_share >= 1.0 or self.held(client) + count <= self.limit_now(client)

    async def admit(self, count: int, client: str, waiting: Callable[[], int]) -> None:
        """Wait (up to client_wait_s) until `client` has room for `count` more images; returns
        at once when it has, when the request could never fit, or when the whole queue is full
        (`waiting()`: its images now): then check() refuses at once, as overload must be."""
        if self._fits_client(count, client) or count > self.ceiling:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.client_wait_s
        while not self._fits_client(count, client):
            if waiting() + count > self.max_queue:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return  # check() refuses it
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(client, deque()).append(waiter)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), remaining)
            finally:
                if not waiter.done():
                    waiter.cancel()  # skipped by hold()
                elif self._fits_client(1, client):
                    self._pass_on(client)

    def _pass_on(self, client: str) -> None:
        """A woken waiter that leaves (timed out, cancelled, or done) lets the next one look."""
        waiters = self._waiters.get(client)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        if waiters is not None and not waiters:
            del self._waiters[client]

    def check(self, count: int, client: str, waiting: int) -> None:
        """Refuse `count` more images of `client` when they do not fit (module docstring);
        `waiting`: the queue's images now (queued and reserved)."""
        if count > self.max_queue:  # can never fit: not transient, so not a QueueFull
            raise LimitExceeded(
                f"{count} images in one request exceed the whole batch queue "
                f"(max_queue_images={self.max_queue}); split the request"
            )
        if count > self.ceiling:
            raise LimitExceeded(
                f"{count} images (TTA views included) in one request exceed what one client may "
                f"ever queue ({self.ceiling}: max_queue_images={self.max_queue} less one "
                "client_queue_share kept for others); split the request"
            )
        if waiting + count > self.max_queue:
            raise QueueFull(
                f"batch queue is full ({waiting} images waiting, limit "
                f"max_queue_images={self.max_queue}); retry with backoff"
            )
        if not self._fits_client(count, client):
            raise QueueFull(
                f"this client already has {self.held(client)} images queued or running, and "
                f"one client may hold {self.limit_now(client)} now (its client_queue_share of "
                "max_queue_images, more while the queue is otherwise idle); other clients are "
                "still served; retry with backoff once your earlier requests are answered"
            )
