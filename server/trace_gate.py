"""One gate between torch.fx tracing and every forward in the process.

While torch.fx traces, it patches `nn.Module.__call__` (and `__getattr__`) on the class, for
every thread: a forward running on another device's worker at that moment enters the tracer's
wrapper and fails ("module is not installed as a submodule"), and a trace started mid-forward
records the other thread's calls. So a trace (catalogue build, shape propagation) holds the gate
alone, and forwards (requests, warm-up, timing, hook discovery) hold it shared: forwards run
side by side, a trace waits for the running ones and holds new ones back until it is done. Traces
happen at model load only, so requests wait for at most one catalogue build.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["forwarding", "tracing"]

_cond = threading.Condition()
_forwards = 0  # forwards running now
_tracing = False  # a trace holds the gate
_waiting_traces = 0  # traces waiting: new forwards yield to them (no starvation of loads)
_owner: int | None = None  # the tracing thread (its own shape-propagation forwards pass)


@contextmanager
def tracing() -> Iterator[None]:
    """Hold the gate alone: no forward runs anywhere until the block ends."""
    global _tracing, _waiting_traces, _owner
    with _cond:
        _waiting_traces += 1
        try:
            _cond.wait_for(lambda: not _tracing and _forwards == 0)
        finally:
            _waiting_traces -= 1
        _tracing, _owner = True, threading.get_ident()
    try:
        yield
    finally:
        with _cond:
            _tracing, _owner = False, None
            _cond.notify_all()


@contextmanager
def forwarding() -> Iterator[None]:
    """Hold the gate shared for one forward; inside a trace on the same thread, pass through."""
    global _forwards
    if _owner == threading.get_ident():
        yield
        return
    with _cond:
        _cond.wait_for(lambda: not _tracing and _waiting_traces == 0)
        _forwards += 1
    try:
        yield
    finally:
        with _cond:
            _forwards -= 1
            if _forwards == 0:
                _cond.notify_all()
