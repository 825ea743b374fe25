"""Fairness between clients: who a call is from, and the weighted fair queuing tags the batcher
orders work by. Torch-free and constant work per item.

A client is its bearer token (so one tenant is one client however many connections it opens),
else its connection (the peer address and port: without tokens the server cannot tell two
processes behind one address apart, and a single address is what a load balancer shows).
Each client has a weight (a token entry's `weight=N`, else 1).

Tags are self-clocked fair queuing (Golestani 1994): an item of cost c from client k gets the
finish tag max(V, last_k) + c / w_k, where last_k is k's previous tag and V the tag of the item
the worker took last; the batcher serves the smallest tags first. A client that queued far
ahead (a flood) has tags far in the future, so a client that just arrives is served next, and
over time each busy client gets the worker in proportion to its weight. With one client the
tags follow arrival order: the same FIFO as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

PRUNE_AT = 4096  # idle clients' tags are forgotten once this many are kept


@dataclass(frozen=True)
class Client:
    """Who a request is from (`key`, safe to log: a token is hashed) and its weight."""

    key: str
    weight: float = 1.0


ANONYMOUS = Client("")
# The client of the RPC the current task serves (set by @rpc); items it submits carry it.
CLIENT: ContextVar[Client] = ContextVar("layertap_client", default=ANONYMOUS)


def token_key(token: str) -> str:
    """A client key for a token that never reveals it (logs, metrics)."""
    return "token:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


def identify(token: str | None, peer: str, weights: Mapping[str, float]) -> Client:
    """The client of a call: its token when it sent one, else its connection."""
    if token:
        return Client(token_key(token), weights.get(token, 1.0))
    return Client("peer:" + peer[:200])


class FairTags:
    """The finish tags of one queue (module docstring)."""

    def __init__(self) -> None:
        self.virtual = 0.0  # V: the tag of the item the worker took last
        self._last: dict[str, float] = {}

    def tag(self, client: Client, cost: float) -> float:
        """The finish tag of a new item of `client` costing `cost` (1: one image at the
        reference size)."""
        start = max(self.virtual, self._last.get(client.key, 0.0))
        finish = start + max(cost, 1e-6) / max(client.weight, 1e-6)
        self._last[client.key] = finish
        return finish

    def served(self, tags: Iterable[float]) -> None:
        """The worker took items with these tags: V moves to the smallest (the head's), never
        back. Not the largest: a batch filled up with a flood's far-future items must not
        push everyone else's next tags behind the flood."""
        head = min(tags, default=self.virtual)
        self.virtual = max(self.virtual, head)
        if len(self._last) > PRUNE_AT:  # clients whose tags V passed start from V anyway
            self._last = {k: t for k, t in self._last.items() if t > self.virtual}

    def behind(self, client: str) -> bool:
        """Whether `client`'s next item would start at V (it is owed service, not ahead)."""
        return self._last.get(client, 0.0) <= self.virtual + 1.0
