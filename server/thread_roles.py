"""CPU time per thread role (event loop, decode pool, worker, compile, gRPC core, the rest), read
from /proc for `layertap_thread_cpu_seconds_total{role}`: where the server's CPU goes, stage by
stage, without a profiler (docs/BENCHMARKS.md's analysis reads it per image).

Each of layertap's own threads registers its role when it starts. Threads it does not start are
told apart by the name the OS gives them: gRPC's C core names its threads (`event_engine`,
`grpc_global_tim`, `lifeguard`, …); torch's intra-op (OpenMP) threads and Python threads nobody
registered keep the process's name and count as "other" (on a busy server, nearly all intra-op
work: the worker thread is OpenMP's thread 0 and the others run the same forward).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

_ROLES: dict[int, str] = {}  # native thread id -> role
# gRPC's C core names its threads: its I/O event engine, timers, and the rest
_GRPC_PREFIXES = ("grpc", "event_engine", "lifeguard", "default-executo", "resolver-execu")
_TASKS = Path("/proc/self/task")


def register(role: str) -> None:
    """Count the calling thread's CPU time under `role` from now on."""
    _ROLES[threading.get_native_id()] = role


def _role(tid: int, name: str) -> str:
    if tid in _ROLES:
        return _ROLES[tid]
    if name.startswith(_GRPC_PREFIXES):
        return "grpc core"
    return "other"


def cpu_seconds_by_role() -> dict[str, float]:
    """Seconds of user + system CPU per role, over the process's live threads (a thread that
    ended takes its time with it: layertap's threads live as long as the server)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    try:
        tasks = list(_TASKS.iterdir())
    except OSError:  # no /proc (macOS): nothing to report
        return out
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        role = _role(int(task.name), name)
        out[role] = out.get(role, 0.0) + seconds
    return out


class ThreadCpuCollector(Collector):
    """`layertap_thread_cpu_seconds_total{role}`, read at each scrape."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "layertap_thread_cpu_seconds",
            "CPU seconds of the server's threads by role: event loop (gRPC parse and write, "
            "validation), decode (decode, preprocess, finish and encode), worker (forward, "
            "pooling), compile, grpc core, other (torch intra-op threads and the rest)",
            labels=["role"],
        )
        for role, seconds in sorted(cpu_seconds_by_role().items()):
            family.add_metric([role], seconds)
        yield family
