"""Extractor builds are a budgeted resource: each client (server/fairness.py) may cause at most
`max_builds_per_client_per_minute` builds (a request whose node set has no extractor cached),
as a token bucket that refills evenly over the minute. Building traces and, with compile on,
compiles a graph on the one worker: a client cycling through node sets would otherwise hold the
worker with builds every batch. Torch-free; constant work per call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRUNE_AT = 4096  # clients remembered before those with a full bucket are forgotten


@dataclass
class BuildBudget:
    per_minute: int  # 0: no bound
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tokens, when

    def take(self, client: str, now: float) -> float:
        """Take one build for `client` at `now` (seconds): 0.0 when taken, else the seconds
        until its next build is allowed."""
        if self.per_minute <= 0:
            return 0.0
        rate = self.per_minute / 60.0
        tokens, then = self._buckets.get(client, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - then) * rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / rate
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > PRUNE_AT:
            self._buckets = {
                k: (t, w)
                for k, (t, w) in self._buckets.items()
                if t + (now - w) * rate < self.per_minute
            }
        return 0.0
