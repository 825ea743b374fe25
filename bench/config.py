"""One benchmark run's settings, fixed before it starts and passed to every phase (the quick
and full modes' timings, the systems, how layertap's servers are started)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DEFAULT_MODELS = ("mobilenet_v2:features.18", "resnet50:layer4")
SYSTEMS = ("inprocess", "layertap", "v2", "naive", "litserve")
"""v2: the layertap server again over its KServe v2 gRPC and HTTP endpoints (needs layertap)."""
MIXED_CLIENTS = 4
# The in-process pipelines (bench/systems.py): torchvision's graph; BatchNorms folded (as
# layertap's extractors); folded and channels-last; folded, channels-last and compiled by inductor.
VARIANTS = ("eager", "folded", "channels-last", "compiled")


@dataclass(frozen=True)
class Timing:
    """How long and how wide each point runs."""

    concurrency: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    seconds: float
    warmup: float
    sweep_seconds: float
    litserve_sweep: tuple[tuple[int, float], ...]  # (max_batch_size, batch_timeout s)
    node_sets: int
    memory_burst: int
    memory_passes: int


FULL = Timing(
    concurrency=(1, 4, 16, 64),
    batch_sizes=(1, 2, 4, 8, 16),
    seconds=8.0,
    warmup=2.0,
    sweep_seconds=4.0,
    litserve_sweep=((4, 0.0), (8, 0.0), (16, 0.0), (8, 0.005), (8, 0.02), (16, 0.01)),
    node_sets=20,
    memory_burst=16,
    memory_passes=2,
)
QUICK = Timing(
    concurrency=(1, 4, 16),
    batch_sizes=(1, 4, 8),
    seconds=2.0,
    warmup=1.0,
    sweep_seconds=1.5,
    litserve_sweep=((8, 0.0),),  # no sweep in quick mode
    node_sets=20,
    memory_burst=4,
    memory_passes=1,
)


def timing_for(
    quick: bool,
    seconds: float | None = None,
    warmup: float | None = None,
    concurrency: tuple[int, ...] | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    node_sets: int | None = None,
) -> Timing:
    """The mode's timing with the command line's overrides; a shorter point also shortens the
    LitServe sweep's points (at most half of it, at least 1 s)."""
    base = QUICK if quick else FULL
    return replace(
        base,
        seconds=base.seconds if seconds is None else seconds,
        warmup=base.warmup if warmup is None else warmup,
        concurrency=concurrency or base.concurrency,
        batch_sizes=batch_sizes or base.batch_sizes,
        node_sets=node_sets or base.node_sets,
        sweep_seconds=(
            base.sweep_seconds
            if seconds is None
            else min(base.sweep_seconds, max(1.0, seconds / 2))
        ),
    )


@dataclass(frozen=True)
class LayertapOptions:
    """Experiments on the layertap servers only (every other system runs as it is)."""

    args: tuple[str, ...] = ()  # extra `layertap serve` flags
    env: tuple[tuple[str, str], ...] = ()  # environment variables
    model_keys: tuple[str, ...] = ()  # `KEY=TOML`, added to each [[models]] table

    def model_lines(self) -> list[str]:
        """The model keys as TOML lines (`KEY = TOML`)."""
        return [" = ".join(kv.split("=", 1)) for kv in self.model_keys]


@dataclass(frozen=True)
class RunConfig:
    """Everything a run's phases and its report read; the command line builds it."""

    timing: Timing = QUICK
    quick: bool = False
    argv: tuple[str, ...] = ()  # the command line, repeated in the report
    device: str = "cpu"
    models: tuple[str, ...] = DEFAULT_MODELS
    aux_model: str = "resnet50:layer4"  # of the memory and mixed phases
    systems: frozenset[str] = frozenset(SYSTEMS)
    naive_threads: int = 8
    mixed_inflight: int = 4
    skip_memory: bool = False
    skip_mixed: bool = False
    inprocess_variants: tuple[str, ...] = VARIANTS
    layertap: LayertapOptions = field(default_factory=LayertapOptions)
    out: str | None = None
    json_out: str | None = None  # the figures as JSON too (bench/gpu_report.py reads them)

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"
