"""Retries with exponential backoff and full jitter, shared by both clients and the bulk engine.

This is the SDK's only retry layer: the channel carries no gRPC retry policy, so attempts
never multiply (gRPC still replays, on its own, calls that never reached a server, and those
are not attempts). A call is retried when it failed with UNAVAILABLE, or with a
RESOURCE_EXHAUSTED the server marked transient (``layertap-retryable: true``: a full queue);
limits (too many images, a message too big) are not marked and are never retried. Every RPC
of the protocol is idempotent, so a retry cannot do anything twice that matters. Retries stay
within the caller's deadline: no attempt starts, and no backoff sleeps, past it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .errors import FeatureServiceError

INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
BACKOFF_MULTIPLIER = 2.0

_R = TypeVar("_R")


def backoff_delay(retry: int, rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(max, initial * multiplier**retry)], retry counted from 0.

    Spreading retries over the whole interval keeps many clients that failed together (a
    replica restart, a full queue) from coming back together."""
    ceiling = min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * BACKOFF_MULTIPLIER ** max(0, retry))
    return ceiling * rng()


def deadline_after(timeout: float | None, now: float | None = None) -> float | None:
    """The monotonic deadline ``timeout`` seconds from now (``None``: none)."""
    if timeout is None:
        return None
    return (time.monotonic() if now is None else now) + timeout


def remaining(deadline: float | None, now: float | None = None) -> float | None:
    """Seconds left before ``deadline`` (at least a sliver, so gRPC reports the expiry)."""
    if deadline is None:
        return None
    return max(0.001, deadline - (time.monotonic() if now is None else now))


def next_delay(
    error: FeatureServiceError,
    retry: int,
    retries: int,
    deadline: float | None,
    now: float | None = None,
) -> float | None:
    """How long to wait before retry number ``retry`` (0-based), or ``None`` to give up: the
    error is not retryable, ``retries`` are used up, or the wait would reach the deadline."""
    if not error.retryable or retry >= retries:
        return None
    delay = backoff_delay(retry)
    if deadline is not None and (time.monotonic() if now is None else now) + delay >= deadline:
        return None
    return delay


def call_with_retries(
    attempt: Callable[[float | None], _R], *, retries: int, timeout: float | None
) -> _R:
    """Run ``attempt(timeout_left)`` until it succeeds or fails for good (blocking)."""
    deadline = deadline_after(timeout)
    retry = 0
    while True:
        try:
            return attempt(remaining(deadline))
        except FeatureServiceError as exc:
            delay = next_delay(exc, retry, retries, deadline)
            if delay is None:
                raise
        time.sleep(delay)
        retry += 1


async def call_with_retries_async(
    attempt: Callable[[float | None], Awaitable[_R]], *, retries: int, timeout: float | None
) -> _R:
    """Run ``await attempt(timeout_left)`` until it succeeds or fails for good."""
    deadline = deadline_after(timeout)
    retry = 0
    while True:
        try:
            return await attempt(remaining(deadline))
        except FeatureServiceError as exc:
            delay = next_delay(exc, retry, retries, deadline)
            if delay is None:
                raise
        await asyncio.sleep(delay)
        retry += 1
