"""Fairness between clients, as pure asyncio (issue 17): weighted fair queuing in the batcher,
each client's share of the queue and its bounded wait, the decode pool's turns, and who a
client is. The end-to-end flood is tests/reliability/test_fairness.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from test_batcher import Recorder

from layertap.server.batcher import Batcher
from layertap.server.errors import LimitExceeded, QueueFull
from layertap.server.fair_pool import FairPool
from layertap.server.fairness import CLIENT, Client, FairTags, identify, token_key
from layertap.server.settings import ConfigError, Settings


def submit(b: Batcher, client: Client, payloads: Sequence[Any]) -> list[asyncio.Future[Any]]:
    """Submit as `client` (what @rpc's CLIENT does for a real call)."""
    token = CLIENT.set(client)
    try:
        return b.submit_many("k", payloads)
    finally:
        CLIENT.reset(token)


@pytest.mark.looptime
async def test_a_client_that_arrives_late_is_served_before_a_flood_queued_earlier() -> None:
    rec = Recorder(delay=0.1)
    b = Batcher(rec, max_batch_size=2, max_wait_s=0.0)
    flood, victim = Client("flood"), Client("victim")
    busy = submit(b, flood, ["f0"])  # the worker is busy with it
    await asyncio.sleep(0.01)
    queued = submit(b, flood, [f"f{i}" for i in range(1, 9)])
    await asyncio.sleep(0.01)
    late = submit(b, victim, ["v1", "v2"])
    await asyncio.gather(*busy, *queued, *late)
    order = [p for _, batch in rec.batches for p in batch]
    # FIFO would have run all eight flood items first; fair queuing interleaves the victim
    assert order.index("v1") <= 2 and order.index("v2") <= 4, order
    await b.close()


@pytest.mark.looptime
async def test_weights_split_the_worker_in_proportion() -> None:
    rec = Recorder(delay=0.1)
    b = Batcher(rec, max_batch_size=1, max_wait_s=0.0)
    heavy, light = Client("heavy", 3.0), Client("light", 1.0)
    busy = submit(b, light, ["x"])
    await asyncio.sleep(0.01)
    futures = submit(b, heavy, [f"h{i}" for i in range(12)]) + submit(
        b, light, [f"l{i}" for i in range(12)]
    )
    await asyncio.gather(*busy, *futures)
    first = [p for _, batch in rec.batches[1:13] for p in batch]
    heavy_share = sum(p.startswith("h") for p in first)
    assert heavy_share == 9, first  # 3:1 over the first twelve served
    await b.close()


@pytest.mark.looptime
async def test_one_client_is_plain_arrival_order() -> None:
    rec = Recorder(delay=0.05)
    b = Batcher(rec, max_batch_size=3, max_wait_s=0.0)
    only = Client("only")
    futures = submit(b, only, [0])
    await asyncio.sleep(0.01)
    for i in range(1, 10):
        futures += submit(b, only, [i])
    await asyncio.gather(*futures)
    assert [p for _, batch in rec.batches for p in batch] == list(range(10))
    await b.close()


@pytest.mark.looptime
async def test_a_client_past_its_share_waits_then_is_refused_while_others_queue() -> None:
    """max_queue 8, client_share 0.25: a share is 2 images, and a client alone may hold up to
    6 (the queue less one share kept for a newcomer)."""
    rec = Recorder(delay=10.0)  # nothing finishes during the test
    b = Batcher(rec, max_batch_size=1, max_queue=8, client_share=0.25, client_wait_s=0.5)
    loop = asyncio.get_running_loop()
    flood = Client("flood")
    token = CLIENT.set(flood)
    held = b.submit_many("k", [1, 2, 3, 4, 5, 6])  # alone: more than its share
    with pytest.raises(LimitExceeded, match="ever queue"):
        b.submit_many("k", list(range(7)))  # can never fit one client: not retryable
    started = loop.time()
    await b.admit(1)  # waits for room that does not come
    assert loop.time() - started == pytest.approx(0.5)
    with pytest.raises(QueueFull, match="one client may hold 6 now") as refused:
        b.submit_many("k", [7])
    assert "other clients are still served" in str(refused.value)
    CLIENT.reset(token)
    other = submit(b, Client("other"), [8, 9])  # the share kept free: another client gets in
    assert len(other) == 2
    token = CLIENT.set(Client("third"))
    with pytest.raises(QueueFull, match="batch queue is full"):  # 7 waiting + 2 > 8
        b.submit_many("k", [10, 11])
    CLIENT.reset(token)
    for fut in held + other:
        fut.cancel()
    await b.close(drain=False)


@pytest.mark.looptime
async def test_a_waiting_client_gets_room_as_soon_as_its_own_image_finishes() -> None:
    rec = Recorder(delay=0.2)
    b = Batcher(rec, max_batch_size=1, max_queue=8, client_share=0.25, client_wait_s=5.0)
    loop = asyncio.get_running_loop()
    token = CLIENT.set(Client("c"))
    first = b.submit_many("k", [1, 2, 3, 4, 5, 6])
    started = loop.time()
    await b.admit(1)
    assert loop.time() - started == pytest.approx(0.2)  # item 1 finished: one image of room
    assert len(b.submit_many("k", [7])) == 1
    CLIENT.reset(token)
    await b.close()
    assert first[0].done()


async def test_the_decode_pool_takes_turns_between_clients() -> None:
    gate = threading.Event()
    ran: list[str] = []

    def job(name: str) -> str:
        gate.wait(5)
        ran.append(name)
        return name

    with ThreadPoolExecutor(1) as executor:
        pool = FairPool(executor, slots=1)

        async def as_(client: str, name: str) -> str:
            CLIENT.set(Client(client))
            return str(await pool.run(job, name))

        tasks = [asyncio.create_task(as_("flood", f"f{i}")) for i in range(6)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(as_("victim", "v")))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*tasks)
    # the victim's one job goes right after the flood's running one, not after its backlog
    assert ran.index("v") == 1, ran


async def test_a_cancelled_caller_never_runs_its_job() -> None:
    ran: list[int] = []
    with ThreadPoolExecutor(1) as executor:
        pool = FairPool(executor, slots=1)
        blocker = threading.Event()
        first = asyncio.create_task(pool.run(blocker.wait, 5))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(pool.run(ran.append, 2))
        await asyncio.sleep(0.01)
        second.cancel()
        blocker.set()
        await first
        await asyncio.sleep(0.05)
    assert ran == [] and pool.running == 0


def test_a_client_is_its_token_else_its_connection() -> None:
    weights = {"tok-a": 2.0}
    a = identify("tok-a", "ipv4:10.0.0.1:5000", weights)
    assert a == Client(token_key("tok-a"), 2.0)
    assert "tok-a" not in a.key  # keys are logged: a token never is
    assert identify("tok-a", "ipv4:10.0.0.2:6000", weights) == a  # same token, any connection
    assert identify(None, "ipv4:10.0.0.1:5000", weights) != identify(
        None, "ipv4:10.0.0.1:5001", weights
    )


def test_token_entries_give_weights_and_models() -> None:
    s = Settings(auth_tokens="tok-a weight=3 m1, tok-b m2, tok-c")
    entries = s.token_entries()
    assert entries["tok-a"].weight == 3.0 and entries["tok-a"].models == frozenset({"m1"})
    assert entries["tok-b"].weight == 1.0 and entries["tok-c"].models is None
    assert s.token_models()["tok-a"] == frozenset({"m1"})
    for bad in ("tok weight=0", "tok weight=x", "tok weight=1 weight=2", "tok weight=inf"):
        with pytest.raises(ConfigError, match="weight"):
            Settings(auth_tokens=bad).token_entries()


def test_tags_forget_idle_clients_and_never_go_back() -> None:
    tags = FairTags()
    first = [tags.tag(Client(f"c{i}"), 1.0) for i in range(5000)]
    tags.served(first[:10])
    assert tags.virtual == 1.0
    tags.served([0.5])
    assert tags.virtual == 1.0  # V never moves back
    tags.served([2.0])
    assert tags.tag(Client("c1"), 1.0) == 3.0  # an idle client starts from V
