"""The issue's performance targets, each judged PASS, FAIL or SKIP (not measured) from a
run's points."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bench.results import Point, Report, fmt


@dataclass
class Target:
    what: str
    model: str
    measured: str
    required: str
    ok: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return "SKIP" if self.ok is None else ("PASS" if self.ok else "FAIL")


def best_litserve(
    report: Report, model: str, c: int, key: str, better: Callable, sweep: bool = True
) -> Point | None:
    """LitServe's best figure at concurrency c over the final run and (with `sweep`) the tuning
    sweep: the most favourable to LitServe, so comparisons with it are conservative."""
    cands = [p for p in report.points if p.system == "LitServe" and p.model == model]
    if sweep:
        cands += report.litserve_sweep.get(model, [])
    cands = [p for p in cands if p.concurrency == c and np.isfinite(getattr(p, key))]
    return better(cands, key=lambda p: getattr(p, key)) if cands else None


def _throughput(report: Report, m: str, ip: Point | None) -> list[Target]:
    """At c=4 and c=16 against LitServe; at c=16 against the fastest in-process pipeline (the
    best variant at its best batch size, measured in the same run)."""
    targets = []
    for c in (4, 16):
        lt = report.get("layertap", m, c)
        ls = best_litserve(report, m, c, "images_per_s", max)
        lt_rate = fmt(lt.images_per_s) if lt else "–"
        targets.append(
            Target(
                f"throughput c={c} ≥ LitServe", m,
                f"{lt_rate} vs {fmt(ls.images_per_s) if ls else '–'} images/s",
                "≥ 1.00×",
                None if not (lt and ls) else lt.images_per_s >= ls.images_per_s,
            )
        )  # fmt: skip
        if c != 16:
            continue
        ratio = f" ({ip.config}) = {lt.images_per_s / ip.images_per_s:.2f}×" if lt and ip else ""
        targets.append(
            Target(
                f"throughput c={c} ≥ 0.9× fastest in-process", m,
                f"{lt_rate} vs {fmt(ip.images_per_s) if ip else '–'} images/s{ratio}",
                "≥ 0.90×",
                None if not (lt and ip) else lt.images_per_s >= 0.9 * ip.images_per_s,
            )
        )  # fmt: skip
    return targets


def _latency(report: Report, m: str) -> list[Target]:
    """p50 at c=1 against LitServe and in-process batch 1; p99 at c=16 against both peers."""
    b1 = report.fastest_batch1(m)
    lt1 = report.get("layertap", m, 1)
    ls1 = best_litserve(report, m, 1, "p50_ms", min)
    targets = [
        Target(
            "p50 c=1 ≤ LitServe", m,
            f"{fmt(lt1.p50_ms) if lt1 else '–'} vs {fmt(ls1.p50_ms) if ls1 else '–'} ms",
            "≤", None if not (lt1 and ls1) else lt1.p50_ms <= ls1.p50_ms,
        ),
        Target(
            "p50 c=1 ≤ fastest in-process batch 1 + 2 ms", m,
            f"{fmt(lt1.p50_ms) if lt1 else '–'} vs {fmt(b1.p50_ms) if b1 else '–'} ms"
            + (f" ({lt1.p50_ms - b1.p50_ms:+.1f}; {b1.config})" if lt1 and b1 else ""),
            "≤ +2 ms", None if not (lt1 and b1) else lt1.p50_ms <= b1.p50_ms + 2,
        ),
    ]  # fmt: skip
    lt16 = report.get("layertap", m, 16)
    naive16 = report.get("naive gRPC", m, 16)
    # p99 from the final run only: the sweep's short points have too few samples for a p99
    ls16 = best_litserve(report, m, 16, "p99_ms", min, sweep=False)
    peers = [p for p in (naive16, ls16) if p is not None]
    ok = None if not (lt16 and naive16 and ls16) else all(lt16.p99_ms < p.p99_ms for p in peers)
    targets.append(
        Target(
            "p99 c=16 below naive and LitServe", m,
            f"{fmt(lt16.p99_ms, 0) if lt16 else '–'} vs naive "
            f"{fmt(naive16.p99_ms, 0) if naive16 else '–'}, LitServe "
            f"{fmt(ls16.p99_ms, 0) if ls16 else '–'} ms",
            "<", ok,
        )
    )  # fmt: skip
    return targets


def evaluate(report: Report) -> list[Target]:
    targets: list[Target] = []
    for spec in report.models:
        targets += _throughput(report, spec.arch, report.fastest(spec.arch))
        targets += _latency(report, spec.arch)
    mem = report.memory
    if mem:
        n = len(mem["sets"])
        targets.append(
            Target(
                f"RSS with {n} node sets ≤ 1.1× RSS with 1", mem["model"],
                f"{mem['twenty']['rss'] / 2**20:.0f} vs {mem['one']['rss'] / 2**20:.0f} MiB "
                f"= {mem['ratio']:.3f}×",
                "≤ 1.10×", mem["ratio"] <= 1.1,
            )
        )  # fmt: skip
    else:
        targets.append(Target("RSS 20 node sets ≤ 1.1× 1", "–", "not measured", "≤ 1.10×", None))
    return targets
