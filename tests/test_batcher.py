"""The batcher as pure asyncio: no torch, no gRPC, milliseconds per test."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from typing import Any

import pytest

from layertap.server.batcher import Batcher
from layertap.server.errors import QueueFull, Unavailable


class Recorder:
    """A run_batch that records the batches it saw and can be slowed or broken."""

    def __init__(self, delay: float = 0.0, fail_on: Any = None) -> None:
        self.batches: list[tuple[Hashable, list[Any]]] = []
        self.delay = delay
        self.fail_on = fail_on

    async def __call__(self, key: Hashable, payloads: list[Any]) -> Sequence[Any]:
        self.batches.append((key, list(payloads)))
        await asyncio.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError("boom")
        return [(key, p) for p in payloads]


async def test_lone_request_on_idle_worker_runs_at_once() -> None:
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, max_wait_s=5.0)  # a long wait must not apply
    loop = asyncio.get_running_loop()
    started = loop.time()
    result, info = await b.submit("k", 1)
    assert result == ("k", 1)
    assert loop.time() - started < 1.0
    assert info.batch_size == 1
    await b.close()


async def test_concurrent_same_key_items_share_a_batch_and_keys_never_mix() -> None:
    rec = Recorder(delay=0.05)
    b = Batcher(rec, max_batch_size=4, max_wait_s=0.01)
    first = b.submit_many("a", [0])  # occupies the worker
    await asyncio.sleep(0.01)
    futures = (
        b.submit_many("a", [1, 2, 3]) + b.submit_many("b", [10, 11]) + b.submit_many("a", [4, 5])
    )
    results = await asyncio.gather(*first, *futures)
    assert [r for r, _ in results][1:4] == [("a", 1), ("a", 2), ("a", 3)]
    keys_seen = [(k, p) for k, p in rec.batches]
    assert keys_seen[0] == ("a", [0])
    # while the worker was busy, 'a' items queued up: the next 'a' batch is full (4), then 'b'
    assert keys_seen[1] == ("a", [1, 2, 3, 4])
    assert keys_seen[2] == ("b", [10, 11])
    assert keys_seen[3] == ("a", [5])
    for key, payloads in rec.batches:
        assert len(payloads) <= 4
        assert all((p >= 10) == (key == "b") for p in payloads)
    await b.close()


async def test_error_reaches_every_waiter_and_the_next_batch_still_runs() -> None:
    rec = Recorder(delay=0.02, fail_on="bad")
    b = Batcher(rec, max_batch_size=8, max_wait_s=0.05)
    busy = b.submit_many("k", ["first"])
    await asyncio.sleep(0.005)
    doomed = b.submit_many("k", ["bad", "x", "y"])
    other = b.submit_many("other", ["fine"])
    assert (await busy[0])[0] == ("k", "first")
    for fut in doomed:
        with pytest.raises(RuntimeError, match="boom"):
            await asyncio.wait_for(fut, 2)
    assert (await asyncio.wait_for(other[0], 2))[0] == ("other", "fine")
    await b.close()


async def test_wrong_result_count_fails_the_batch_instead_of_hanging() -> None:
    async def short(key: Hashable, payloads: list[Any]) -> list[Any]:
        return payloads[:-1]

    b = Batcher(short, max_batch_size=4)
    futures = b.submit_many("k", [1, 2])
    for fut in futures:
        with pytest.raises(RuntimeError, match="returned 1 results for 2"):
            await asyncio.wait_for(fut, 2)
    await b.close()


async def test_per_item_exception_fails_only_that_item() -> None:
    async def mixed(key: Hashable, payloads: list[Any]) -> list[Any]:
        return [ValueError(f"bad {p}") if p < 0 else p for p in payloads]

    b = Batcher(mixed, max_batch_size=4)
    good, bad = b.submit_many("k", [1, -1])
    assert (await good)[0] == 1
    with pytest.raises(ValueError, match="bad -1"):
        await bad
    await b.close()


async def test_cancelled_items_are_dropped_before_compute() -> None:
    rec = Recorder(delay=0.05)
    b = Batcher(rec, max_batch_size=8, max_wait_s=0.0)
    busy = b.submit_many("k", ["busy"])
    await asyncio.sleep(0.005)
    gone = b.submit_many("k", ["gone1", "gone2"])
    kept = b.submit_many("k", ["kept"])
    for fut in gone:
        fut.cancel()
    await busy[0]
    assert (await kept[0])[0] == ("k", "kept")
    computed = [p for _, ps in rec.batches for p in ps]
    assert "gone1" not in computed and "gone2" not in computed
    await b.close()


async def test_full_queue_refuses_the_whole_request_at_once() -> None:
    rec = Recorder(delay=0.2)
    b = Batcher(rec, max_batch_size=2, max_queue=3)
    b.submit_many("k", [1])  # taken by the worker soon
    await asyncio.sleep(0.01)
    b.submit_many("k", [2, 3, 4])
    with pytest.raises(QueueFull, match="max_queue_images=3"):
        b.submit_many("k", [5])
    await b.close(drain=False)


async def test_close_without_drain_fails_waiters_unavailable() -> None:
    rec = Recorder(delay=0.1)
    b = Batcher(rec, max_batch_size=1)
    first = b.submit_many("k", [1])
    await asyncio.sleep(0.01)
    queued = b.submit_many("k", [2])
    await b.close(drain=False)
    assert (await first[0])[0] == ("k", 1)
    with pytest.raises(Unavailable):
        await queued[0]
    with pytest.raises(Unavailable):
        b.submit_many("k", [3])


async def test_max_wait_collects_stragglers_when_busy() -> None:
    rec = Recorder(delay=0.0)
    b = Batcher(rec, max_batch_size=8, max_wait_s=0.1)
    b._busy = True  # pretend a batch is running so the first item is not 'lone'
    f1 = b.submit_many("k", [1])
    b._busy = False
    await asyncio.sleep(0.03)
    f2 = b.submit_many("k", [2])
    await asyncio.gather(*f1, *f2)
    assert rec.batches == [("k", [1, 2])]
    await b.close()


async def test_batch_limit_per_key() -> None:
    rec = Recorder(delay=0.02)
    b = Batcher(rec, max_batch_size=8, batch_limit=lambda key: 2 if key == "small" else 8)
    futures = b.submit_many("small", [1, 2, 3, 4, 5])
    await asyncio.gather(*futures)
    assert [len(p) for _, p in rec.batches] == [2, 2, 1]
    await b.close()
