"""The batcher as pure asyncio: no torch, no gRPC, milliseconds per test.

Every test runs on a virtual clock (looptime): the loop's time advances only when every task
waits, by exactly the next timer's delay, and the batcher reads that same clock. Waits and
forward times below are therefore exact, and a loaded machine cannot reorder them: a test
that asserts a 30 ms wait sees 30 ms, however long the real run took.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from typing import Any

import pytest

from layertap.server.batcher import Batcher
from layertap.server.batching import BatchPolicy, is_deadline
from layertap.server.errors import LimitExceeded, QueueFull, Unavailable

pytestmark = pytest.mark.looptime


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
    assert loop.time() - started == 0  # no timer ran: not even a 1 ms wait
    assert info.batch_size == 1 and info.queue_s == 0
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


async def test_request_larger_than_the_whole_queue_is_a_limit_not_queue_full() -> None:
    """A retry can never succeed, so it must not look transient (QueueFull is retryable)."""
    b = Batcher(Recorder(), max_batch_size=2, max_queue=3)
    with pytest.raises(LimitExceeded, match="split the request") as info:
        b.submit_many("k", [1, 2, 3, 4])
    assert not isinstance(info.value, QueueFull)
    with pytest.raises(LimitExceeded, match="split the request"), b.reserve(4):
        pass
    await b.close()


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
    b._running = 1  # pretend a batch is running so the first item is not 'lone'
    f1 = b.submit_many("k", [1])
    b._running = 0
    await asyncio.sleep(0.03)
    f2 = b.submit_many("k", [2])
    await asyncio.gather(*f1, *f2)
    assert rec.batches == [("k", [1, 2])]
    await b.close()


async def test_a_waiting_batch_runs_max_wait_after_its_head_and_not_before() -> None:
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, preferred_batch_size=4, max_wait_s=0.25)
    b._running = 1  # the worker is busy: the head is not lone
    f1 = b.submit_many("k", [1])
    b._running = 0
    await asyncio.sleep(0.1)
    f2 = b.submit_many("k", [2])  # joins; still below preferred
    (_, i1), (_, i2) = await asyncio.gather(*f1, *f2)
    assert rec.batches == [("k", [1, 2])]
    assert (i1.queue_s, i2.queue_s) == (pytest.approx(0.25), pytest.approx(0.15))


async def test_batch_limit_per_key() -> None:
    rec = Recorder(delay=0.02)
    b = Batcher(rec, policy=lambda key: BatchPolicy(2 if key == "small" else 8))
    futures = b.submit_many("small", [1, 2, 3, 4, 5])
    await asyncio.gather(*futures)
    assert [len(p) for _, p in rec.batches] == [2, 2, 1]
    await b.close()


# --- priority ----------------------------------------------------------------------------
async def _busy_then(b: Batcher, rec: Recorder) -> list[Any]:
    """Occupy the worker with one batch and wait until it runs, so later items queue up."""
    busy = b.submit_many("busy", ["busy"])
    while not rec.batches:
        await asyncio.sleep(0.001)
    return busy


async def test_normal_items_go_before_older_low_items() -> None:
    rec = Recorder(delay=0.03)
    b = Batcher(rec, max_batch_size=2, max_wait_s=0.0, low_priority_max_wait_s=10.0)
    busy = await _busy_then(b, rec)
    low = b.submit_many("k", ["low1", "low2", "low3"], priority=1)
    normal = b.submit_many("k", ["n1", "n2", "n3"])
    await asyncio.gather(*busy, *low, *normal)
    order = [p for _, ps in rec.batches[1:] for p in ps]
    # batches of 2: NORMAL fill first, then LOW, each oldest first
    assert [ps for _, ps in rec.batches[1:]] == [["n1", "n2"], ["n3", "low1"], ["low2", "low3"]]
    assert order.index("n3") < order.index("low1")
    await b.close()


async def test_the_head_is_the_oldest_normal_item_across_keys() -> None:
    rec = Recorder(delay=0.03)
    b = Batcher(rec, max_batch_size=8, max_wait_s=0.0, low_priority_max_wait_s=10.0)
    busy = await _busy_then(b, rec)
    low = b.submit_many("bulk", ["b1", "b2"], priority=1)
    normal = b.submit_many("interactive", ["i1"])
    await asyncio.gather(*busy, *low, *normal)
    assert [k for k, _ in rec.batches[1:]] == ["interactive", "bulk"]
    await b.close()


async def test_low_items_fill_a_normal_batch_of_the_same_key() -> None:
    rec = Recorder(delay=0.03)
    b = Batcher(rec, max_batch_size=4, max_wait_s=0.0, low_priority_max_wait_s=10.0)
    busy = await _busy_then(b, rec)
    low = b.submit_many("k", ["low1"], priority=1)
    other = b.submit_many("other", ["o1"])
    normal = b.submit_many("k", ["n1"])
    await asyncio.gather(*busy, *low, *other, *normal)
    # the head is the oldest NORMAL item ("other"), then "k" with its NORMAL item first
    assert [ps for _, ps in rec.batches[1:]] == [["o1"], ["n1", "low1"]]
    await b.close()


async def test_starvation_guard_promotes_a_low_item_that_waited_too_long() -> None:
    rec = Recorder(delay=0.03)
    b = Batcher(rec, max_batch_size=1, max_wait_s=0.0, low_priority_max_wait_s=0.01)
    busy = await _busy_then(b, rec)
    low = b.submit_many("k", ["old-low"], priority=1)
    await asyncio.sleep(0.02)  # longer than low_priority_max_wait_s: it now counts as NORMAL
    normal = b.submit_many("k", ["n1", "n2"])
    await asyncio.gather(*busy, *low, *normal)
    assert [ps for _, ps in rec.batches[1:]] == [["old-low"], ["n1"], ["n2"]]
    await b.close()


async def test_without_the_guard_window_low_waits_behind_normal() -> None:
    """The same sequence with a long guard: the LOW item runs last (the guard test can fail)."""
    rec = Recorder(delay=0.03)
    b = Batcher(rec, max_batch_size=1, max_wait_s=0.0, low_priority_max_wait_s=10.0)
    busy = await _busy_then(b, rec)
    low = b.submit_many("k", ["old-low"], priority=1)
    await asyncio.sleep(0.02)
    normal = b.submit_many("k", ["n1", "n2"])
    await asyncio.gather(*busy, *low, *normal)
    assert [ps for _, ps in rec.batches[1:]] == [["n1"], ["n2"], ["old-low"]]
    await b.close()


# --- preferred batch size and per-key policy -----------------------------------------------
async def test_preferred_batch_size_stops_the_wait_early() -> None:
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, preferred_batch_size=2, max_wait_s=30.0)
    b._running = 1  # the worker is busy: the head is not lone and would wait max_wait
    futures = b.submit_many("k", [1])
    b._running = 0
    await asyncio.sleep(0.01)
    assert rec.batches == []  # one item, fewer than preferred: still waiting
    futures += b.submit_many("k", [2])
    results = await asyncio.wait_for(asyncio.gather(*futures), 5)  # not 30 s
    assert [r for r, _ in results] == [("k", 1), ("k", 2)]
    assert rec.batches == [("k", [1, 2])]
    await b.close()


async def test_preferred_batch_size_takes_all_queued_up_to_the_max() -> None:
    rec = Recorder(delay=0.03)
    b = Batcher(rec, max_batch_size=5, preferred_batch_size=2, max_wait_s=30.0)
    busy = await _busy_then(b, rec)
    queued = b.submit_many("k", list(range(7)))
    await asyncio.wait_for(asyncio.gather(*busy, *queued), 5)
    assert [len(ps) for _, ps in rec.batches[1:]] == [5, 2]
    await b.close()


async def test_lone_request_never_waits_even_below_preferred() -> None:
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, preferred_batch_size=4, max_wait_s=30.0)
    result, info = await asyncio.wait_for(b.submit("k", 1), 5)
    assert result == ("k", 1) and info.batch_size == 1
    await b.close()


async def test_policy_per_key_sets_limit_preferred_size_and_wait() -> None:
    rec = Recorder(delay=0.03)

    def policy(key: Hashable) -> BatchPolicy:
        if key == "small":
            return BatchPolicy(max_batch_size=2, max_wait_s=0.0)
        return BatchPolicy(max_batch_size=8, preferred_batch_size=3, max_wait_s=30.0)

    b = Batcher(rec, policy=policy)
    busy = await _busy_then(b, rec)
    small = b.submit_many("small", [1, 2, 3])
    big = b.submit_many("big", list(range(10, 16)))
    await asyncio.wait_for(asyncio.gather(*busy, *small, *big), 5)  # "big" never waits 30 s
    sizes = {k: [len(ps) for kk, ps in rec.batches if kk == k] for k in ("small", "big")}
    assert sizes == {"small": [2, 1], "big": [6]}
    await b.close()


# --- drops: cancelled vs deadline --------------------------------------------------------
async def test_drop_hook_tells_cancelled_from_deadline_and_nothing_dropped_is_computed() -> None:
    rec = Recorder(delay=0.05)
    drops: list[tuple[Hashable, str]] = []
    b = Batcher(rec, max_batch_size=8, max_wait_s=0.0, on_drop=lambda k, r: drops.append((k, r)))
    busy = await _busy_then(b, rec)
    cancelled = b.submit_many("k", ["cancel-me"], deadline=asyncio.get_running_loop().time() + 60)
    expired = b.submit_many("k", ["too-late"], deadline=asyncio.get_running_loop().time() + 0.01)
    # the client's timer fires first: its cancel arrives a little before our deadline
    early = b.submit_many("k", ["client-timer"], deadline=asyncio.get_running_loop().time() + 0.04)
    no_deadline = b.submit_many("k", ["gone"])
    kept = b.submit_many("k", ["kept"])
    cancelled[0].cancel()
    no_deadline[0].cancel()
    await asyncio.sleep(0.02)
    expired[0].cancel()  # what gRPC does when the deadline passes
    early[0].cancel()  # 20 ms before its deadline: within the slack
    await asyncio.gather(*busy, *kept)
    await asyncio.sleep(0)  # done-callbacks run on the next loop turn
    assert sorted(drops) == [("k", "cancelled")] * 2 + [("k", "deadline")] * 2
    assert b.dropped == {"cancelled": 2, "deadline": 2}
    computed = [p for _, ps in rec.batches for p in ps]
    assert computed == ["busy", "kept"]
    await b.close()


def test_deadline_slack_grows_with_the_timeout() -> None:
    """50 ms, or 2 % of the timeout when that is more: a cancel 1 s before a 100 s deadline is
    the client's timer, 10 s before it is a cancel."""
    assert is_deadline(now=0.96, deadline=1.0, since=0.0)
    assert not is_deadline(now=0.9, deadline=1.0, since=0.0)
    assert is_deadline(now=99.0, deadline=100.0, since=0.0)
    assert not is_deadline(now=90.0, deadline=100.0, since=0.0)
    assert is_deadline(now=101.0, deadline=100.0, since=0.0)


async def test_cancel_during_compute_is_not_a_drop() -> None:
    rec = Recorder(delay=0.05)
    drops: list[str] = []
    b = Batcher(rec, max_batch_size=8, on_drop=lambda k, r: drops.append(r))
    futures = b.submit_many("k", [1, 2])
    while not rec.batches:
        await asyncio.sleep(0.001)
    futures[0].cancel()
    assert (await futures[1])[0] == ("k", 2)
    assert drops == [] and b.dropped == {}
    await b.close()


# --- keys -------------------------------------------------------------------------------
async def test_group_key_keeps_payload_groups_apart() -> None:
    rec = Recorder(delay=0.03)
    b = Batcher(rec, max_batch_size=8, max_wait_s=0.0, group_key=lambda k, p: (k, p[0]))
    busy = await _busy_then(b, rec)
    futures = b.submit_many("m", ["a1", "b1"]) + b.submit_many("m", ["a2"])
    results = await asyncio.gather(*busy, *futures)
    assert sorted(ps for k, ps in rec.batches[1:]) == [["a1", "a2"], ["b1"]]
    assert results[1][0] == (("m", "a"), "a1")
    await b.close()


async def test_batch_info_names_the_batcher_and_load_counts_queued_and_running() -> None:
    rec = Recorder(delay=0.05)
    b = Batcher(rec, max_batch_size=2, max_wait_s=0.0, name="cpu:1")
    first = b.submit_many("k", [1, 2])
    while not rec.batches:
        await asyncio.sleep(0.001)
    more = b.submit_many("k", [3])
    assert b.load == 3  # two computing, one queued
    with b.reserve(4):
        assert b.load == 7
    results = await asyncio.gather(*first, *more)
    assert {info.device for _, info in results} == {"cpu:1"}
    await b.close()


# --- companions: the clients a batch just answered -------------------------------------------
async def _closed_loop(b: Batcher, clients: int, rounds: int, think_s: float) -> None:
    """`clients` closed loops: each sends, awaits its answer, 'thinks' (the reply's trip back,
    the client's work, the next request's trip in), and sends again."""

    async def client(k: int) -> None:
        await asyncio.sleep(0.002 * k)  # they start apart, as real clients do
        for i in range(rounds):
            await b.submit("k", (k, i))
            await asyncio.sleep(think_s)

    await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(clients))), 30)


@pytest.mark.parametrize("companion_wait_s", [0.0, 0.5])
async def test_closed_loop_clients_keep_sharing_forwards_with_companion_waits(
    companion_wait_s: float,
) -> None:
    """Four closed-loop clients, forwards of 100 ms, 5 ms between an answer and the next
    request (inside the window, 0.3 x 100 ms). Without companion waits they never share one
    forward again (one and three: the first request found the worker idle, and whoever is
    queued when it frees goes); with them, batches of four."""
    rec = Recorder(delay=0.1)
    b = Batcher(rec, max_batch_size=8, preferred_batch_size=4, companion_wait_s=companion_wait_s)
    await _closed_loop(b, clients=4, rounds=6, think_s=0.005)
    sizes = [len(ps) for _, ps in rec.batches]
    steady = sizes[2:-2]  # the first client starts alone, and finishes its rounds first
    if companion_wait_s:
        assert set(steady) == {4}, sizes
        assert sizes == [1, 4, 4, 4, 4, 4, 3]  # 24 requests in 7 forwards
    else:
        assert max(steady) < 4, sizes
        assert sizes == [1, 3] * 6  # 24 requests in 12 forwards
    await b.close()


async def test_after_a_batch_of_one_a_request_never_waits() -> None:
    """One closed-loop client: every batch holds one image, so the next request is lone."""
    rec = Recorder(delay=0.2)  # a wrongly held request would wait 0.3 x 200 ms
    b = Batcher(rec, max_batch_size=8, preferred_batch_size=4, companion_wait_s=5.0)
    await b.submit("k", 0)
    await asyncio.sleep(0.001)
    _, info = await b.submit("k", 1)
    assert info.batch_size == 1
    assert info.queue_s == 0, info
    await b.close()


async def test_companion_wait_is_bounded_by_a_share_of_the_batch_run_time() -> None:
    """Companions that never come: the next batch waits no longer than 0.3 of the last
    batch's run time after it ended (here 0.3 x 100 ms), however large companion_wait_s is."""
    rec = Recorder(delay=0.1)
    b = Batcher(rec, max_batch_size=8, preferred_batch_size=4, companion_wait_s=5.0)
    await asyncio.gather(*b.submit_many("k", [1, 2, 3]))
    ended = asyncio.get_running_loop().time()
    _, info = await b.submit("k", 4)  # its companions 2 and 3 do not send again
    waited = asyncio.get_running_loop().time() - ended
    assert info.batch_size == 1
    assert info.queue_s == pytest.approx(0.3 * 0.1), info  # the window, then it runs alone
    assert waited == pytest.approx(0.3 * 0.1 + 0.1), waited
    await b.close()


async def test_companion_waits_apply_only_to_the_key_that_just_ran() -> None:
    rec = Recorder(delay=0.2)
    b = Batcher(rec, max_batch_size=8, preferred_batch_size=4, companion_wait_s=5.0)
    await asyncio.gather(*b.submit_many("a", [1, 2, 3]))
    _, info = await b.submit("b", 4)  # another model or node set: a lone request
    assert info.queue_s == 0, info
    await b.close()
