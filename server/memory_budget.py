"""The server's memory budget: every request reserves its estimated peak bytes (budgets.
peak_bytes) before anything of it is decoded, and gives them back when its answer is built.

- Over the per-request cap (`max_request_memory_bytes`): RESOURCE_EXHAUSTED at once, not
  retryable, saying how many images of that size, or how many pixels per image, would fit.
- Over the calling client's share of the budget (`client_queue_share` of it) or over what is
  free: RESOURCE_EXHAUSTED with the retryable trailer; others' reservations are untouched.

The default budget is half the memory this process may use (the cgroup's limit when it has one,
else the machine's), the per-request cap a quarter of the budget. Torch-free; constant work per
call on the event loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .budgets import MIB, Estimate
from .errors import LimitExceeded, QueueFull
from .settings import Settings

CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory() -> int:
    """Bytes this process may use: the cgroup's memory limit when set, else physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical


@dataclass
class MemoryBudget:
    total: int
    per_request: int
    client_share: float = 1.0
    used: int = 0
    _clients: dict[str, int] = field(default_factory=dict)

    @property
    def client_limit(self) -> int:
        return max(1, int(self.total * min(1.0, self.client_share)))

    def _refuse_never_fits(self, estimate: Estimate, native: bool) -> None:
        cap = self.per_request
        fit = cap // max(1, estimate.per_image)
        hints = [f"send at most {fit} such images per request" if fit else ""]
        if native or not fit:
            pixels = int(cap / max(estimate.per_pixel, 1e-9))
            hints.append(f"downscale each image to at most {pixels} pixels")
        hint = " or ".join(h for h in hints if h)
        raise LimitExceeded(
            f"this request would hold about {estimate.total / MIB:.0f} MiB at its peak "
            f"({estimate.describe()}), over the per-request cap max_request_memory_bytes="
            f"{cap} ({cap / MIB:.0f} MiB); {hint}"
        )

    @contextlib.contextmanager
    def reserve(self, estimate: Estimate, client: str, native: bool = False) -> Iterator[None]:
        """Hold `estimate.total` bytes for the block, or refuse (module docstring)."""
        need = estimate.total
        if need > self.per_request:
            self._refuse_never_fits(estimate, native)
        held = self._clients.get(client, 0)
        if held and held + need > self.client_limit:
            raise QueueFull(
                f"this client's requests already hold {held / MIB:.0f} MiB of the server's "
                f"memory budget and one client may hold {self.client_limit / MIB:.0f} MiB "
                "(client_queue_share of memory_budget_bytes); retry once your earlier requests "
                "are answered"
            )
        if self.used + need > self.total:
            raise QueueFull(
                f"the server's memory budget is in use ({self.used / MIB:.0f} of "
                f"{self.total / MIB:.0f} MiB reserved; this request needs about "
                f"{need / MIB:.0f} MiB); retry with backoff"
            )
        self.used += need
        self._clients[client] = held + need
        try:
            yield
        finally:
            self.used -= need
            left = self._clients.get(client, 0) - need
            if left > 0:
                self._clients[client] = left
            else:
                self._clients.pop(client, None)


def memory_budget(settings: Settings) -> MemoryBudget:
    """The budget the settings ask for (0: half the machine's memory; a quarter of it per
    request), shared by the whole server."""
    total = settings.memory_budget_bytes or machine_memory() // 2
    per_request = settings.max_request_memory_bytes or total // 4
    return MemoryBudget(total, min(per_request, total), settings.client_queue_share)
