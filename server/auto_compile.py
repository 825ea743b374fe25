"""compile = "auto": extractors compiled with torch.compile (inductor) where a start-up timing
shows it wins, the way channels-last is chosen.

Static shapes, a bounded set of them: each compiled extractor holds one graph per batch size the
batcher forms (on the CPU every size up to the batch limit; past 8, powers of two and the limit),
at the model's input size. A batch of any other shape (native resolution, TTA scales, a size
not compiled yet) runs the eager extractor, so no forward ever waits for a compile. At load one
graph is compiled, to decide; every other size, and every node set built later (warm-up sets
included), compiles on one background thread for the process while the extractor serves eager,
each size switching over as it is ready, within `compile_budget_s` per node set. So the cold
start pays one compile per model. torch.compile keeps its generated code in inductor's cache
directory (`compile_cache_dir`), so a restart with a warm cache skips code generation, and the
timing's verdict is kept beside it, so that restart skips the timing too.

Why not dynamic shapes: on the 2-core CPU a dynamic-batch graph compiled about 8 times slower
and ran no faster than eager at batch 4 (docs/BENCHMARKS.md, "Compiled extractors").
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import thread_roles
from .extractors import run_extractor
from .loaded import LoadedModel
from .settings import Settings, batch_limit

log = logging.getLogger("layertap.compile")

GAIN = 0.9  # compiled is kept when its forward takes at most this share of eager's
SMALL_FORWARD_MS = 20.0  # faster eager forwards are not worth a compile (as for channels-last)
ROUNDS = 3  # interleaved timing rounds, median of each
LONG_FORWARD_MS = 200.0  # longer forwards are timed in one round of two calls each


def compiler_missing(device: torch.device) -> str | None:
    """Why inductor cannot compile for `device` here, or None when it can."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (inductor generates Triton kernels for CUDA)"
        return None
    if device.type != "cpu":
        return f"inductor does not compile for {device.type} here"
    if os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return None
    return "no C++ compiler (g++, c++ or clang++) on PATH; inductor builds C++ kernels on the CPU"


def compiled_sizes(limit: int) -> tuple[int, ...]:
    """The batch sizes compiled, most useful first: the limit (a busy server), 1 (a lone
    request), then the rest (every size up to 8; past that, the powers of two)."""
    if limit <= 8:
        rest = list(range(limit - 1, 1, -1))
    else:
        rest = [2**k for k in range(limit.bit_length() - 1, 0, -1)]
    return tuple(dict.fromkeys(s for s in (limit, 1, *rest) if 1 <= s <= limit))


class CompiledExtractor(torch.nn.Module):
    """An eager extractor and its compiled twin: batches of a shape compiled ahead run compiled,
    any other shape eager. `ready` only grows (a set add is atomic), so the worker can read it
    while the background thread compiles."""

    def __init__(self, eager: torch.nn.Module) -> None:
        super().__init__()
        self.eager = eager
        # dynamic=False: one static graph per shape, never a dynamic one (see the docstring)
        self.compiled: torch.nn.Module = torch.compile(  # type: ignore[assignment]
            eager, backend="inductor", dynamic=False
        )
        self.ready: set[tuple[int, ...]] = set()

    def forward(self, x: torch.Tensor) -> object:
        if tuple(x.shape) in self.ready:
            return self.compiled(x)
        return self.eager(x)


def compile_shapes(
    extractor: CompiledExtractor,
    shapes: Iterable[tuple[int, ...]],
    run: Callable[[torch.nn.Module, torch.Tensor], object],
    make: Callable[[tuple[int, ...]], torch.Tensor],
    deadline: float,
) -> float:
    """Compile `extractor` for each shape until `deadline` (time.monotonic); returns seconds."""
    started = time.monotonic()
    for shape in shapes:
        if shape in extractor.ready:
            continue
        if time.monotonic() > deadline:
            log.info("compile budget spent: batch shape %s stays eager", shape)
            break
        run(extractor.compiled, make(shape))
        extractor.ready.add(shape)
    return time.monotonic() - started


def timed_ms(run: Callable[[], object], sync: Callable[[], None], calls: int = 3) -> float:
    """Median ms of `calls` calls after one untimed (allocator, kernel choice, caches)."""
    times = []
    for i in range(calls + 1):
        started = time.perf_counter()
        run()
        sync()
        if i:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def compiled_wins(
    extractor: CompiledExtractor,
    x: torch.Tensor,
    run: Callable[[torch.nn.Module, torch.Tensor], object],
    sync: Callable[[], None],
    rounds: int = ROUNDS,
    calls: int = 3,
) -> tuple[bool, float, float]:
    """Whether the compiled forward of `x` (compiled already) beats eager by GAIN: interleaved
    rounds, medians. Returns (wins, eager ms, compiled ms)."""
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(rounds):
        times["eager"].append(timed_ms(lambda: run(extractor.eager, x), sync, calls))
        times["compiled"].append(timed_ms(lambda: run(extractor.compiled, x), sync, calls))
    eager, compiled = (statistics.median(times[k]) for k in ("eager", "compiled"))
    return compiled <= GAIN * eager, eager, compiled


class BackgroundCompiler:
    """One thread for the process that compiles node sets asked for after load, one at a time
    (torch.compile is not safe to run twice at once); requests meanwhile run them eager."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.pending = 0

    def submit(self, job: Callable[[], object]) -> None:
        with self._lock:
            self.pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="compile", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        thread_roles.register("compile")
        while True:
            job = self._jobs.get()
            try:
                job()  # its forwards hold the trace gate (server/trace_gate.py) one by one
            except Exception as exc:  # the set stays eager: slower, still correct
                log.warning("a background compile failed; that node set stays eager: %s", exc)
            finally:
                with self._lock:
                    self.pending -= 1

    def wait_idle(self, timeout: float) -> bool:
        """For tests and shutdown: True once no job is queued or running."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.pending


BACKGROUND = BackgroundCompiler()

VERDICTS = "layertap-compile-verdicts.json"  # in inductor's cache directory
_verdicts_lock = threading.Lock()


def _verdicts_path() -> str:
    """Beside inductor's own cache (compile_cache_dir), so a warm cache means warm verdicts."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.join(cache_dir(), VERDICTS)


def verdict_key(loaded: LoadedModel, device: torch.device, shape: tuple[int, ...]) -> str:
    """What a timing depends on: the model and its weights, the graph timed, its input, layout
    and compute dtype, torch, the processor and the threads."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = next(
            (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
            "cpu",
        )
    w, catalog = loaded.weights, loaded.catalog
    parts = (
        w.weights_id, w.sha256, catalog.nodes[-1].name, len(catalog.nodes), shape,
        loaded.channels_last, loaded.autocast, torch.__version__, chip, torch.get_num_threads(),
    )  # fmt: skip
    return "|".join(map(str, parts))


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(20000).splitlines()
    except OSError:
        return []


def read_verdicts() -> dict[str, dict[str, Any]]:
    """Earlier starts' timings on this cache; none when it is missing or unreadable."""
    try:
        with open(_verdicts_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember(key: str, verdict: dict[str, Any]) -> None:
    """Keep a timing's verdict for the next start (atomically; best effort)."""
    with _verdicts_lock:
        data = read_verdicts()
        data[key] = verdict
        path = _verdicts_path()
        try:
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as f:
                json.dump(data, f)
            os.replace(f.name, path)
        except OSError as exc:
            log.info("could not keep the compile verdict in %s: %s", path, exc)


def choose(
    loaded: LoadedModel,
    device: torch.device,
    settings: Settings,
    build: Callable[[LoadedModel, tuple[str, ...]], torch.nn.Module],
) -> None:
    """compile = "auto", at load, after the layout is chosen: compile the deepest-node extractor
    at the batch limit and keep it compiled when it is at least 1/GAIN times faster than eager;
    then queue its other sizes for the background thread, and set `loaded.compile_job` so the
    model's later extractors are compiled there too. Eager, with a log line saying why, when
    there is no compiler, warm-up is off, the budget is 0, the forward is tiny, compiling fails
    or it does not win."""
    cfg, catalog = loaded.config, loaded.catalog
    if cfg.compile != "auto" or catalog.mode != "fx" or not catalog.nodes:
        return
    why = compiler_missing(device)
    if why is None and not settings.warmup:
        why = "warmup is off, so nothing is timed"
    if why is None and settings.compile_budget_s <= 0:
        why = "compile_budget_s = 0"
    if why is not None:
        log.info("model %s: eager extractors (compile = 'auto': %s)", cfg.name, why)
        return
    limit = batch_limit(settings, cfg, device.type)
    shapes = [(n, 3, *catalog.input_size) for n in compiled_sizes(limit)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(module: torch.nn.Module, x: torch.Tensor) -> object:
        return run_extractor(loaded, module, x, device)

    def make(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, device=device)

    nodes = (catalog.nodes[-1].name,)
    key = verdict_key(loaded, device, shapes[0])
    remembered = read_verdicts().get(key)
    if remembered is not None and not remembered["wins"]:
        log.info(
            "model %s: eager extractors (an earlier start here timed batch-%d forwards at %.1f ms "
            "eager, %.1f ms compiled)",
            cfg.name, shapes[0][0], remembered["eager_ms"], remembered["compiled_ms"],
        )  # fmt: skip
        return
    eager = build(loaded, nodes)
    x = make(shapes[0])
    first = timed_ms(lambda: run(eager, x), sync, calls=1) if remembered is None else 1e9
    if first < SMALL_FORWARD_MS:
        log.info("model %s: eager extractors (forward under %.0f ms)", cfg.name, SMALL_FORWARD_MS)
        return
    # a long forward varies less: fewer of them decide (vgg16 at batch 4 on 2 cores: ~1.5 s)
    rounds, calls = (ROUNDS, 3) if first < LONG_FORWARD_MS else (1, 2)
    started = time.monotonic()
    extractor = CompiledExtractor(eager)
    log.info(
        "model %s: compiling its batch-%d forward with inductor%s (compile = '' skips this)",
        cfg.name, shapes[0][0], "" if remembered else " to time it against eager",
    )  # fmt: skip
    try:
        compile_shapes(extractor, shapes[:1], run, make, float("inf"))
        if remembered is not None:  # a won verdict of an earlier start: not timed again
            wins, eager_ms, compiled_ms = True, remembered["eager_ms"], remembered["compiled_ms"]
        else:
            wins, eager_ms, compiled_ms = compiled_wins(extractor, x, run, sync, rounds, calls)
            remember(key, {"wins": wins, "eager_ms": eager_ms, "compiled_ms": compiled_ms})
    except Exception as exc:  # a model inductor cannot compile stays eager
        log.warning("model %s: eager extractors (compiling failed: %s)", cfg.name, exc)
        return
    if wins:
        loaded.extractors[nodes] = extractor
    loaded.compile_seconds = time.monotonic() - started
    log.info(
        "model %s: %s extractors (batch-%d forward %.1f ms eager, %.1f ms compiled%s; compiled "
        "in %.1f s%s)",
        cfg.name,
        "compiled" if wins else "eager",
        shapes[0][0],
        eager_ms,
        compiled_ms,
        ", timed by an earlier start here" if remembered else "",
        loaded.compile_seconds,
        f"; {len(shapes) - 1} more batch sizes compile in the background" if wins else "",
    )
    if not wins:
        return
    budget = settings.compile_budget_s

    def compile_later(new: CompiledExtractor) -> None:
        BACKGROUND.submit(lambda: compile_shapes(new, shapes, run, make, time.monotonic() + budget))

    compile_later(extractor)

    def job(eager: torch.nn.Module) -> torch.nn.Module:
        new = CompiledExtractor(eager)  # eager until each size is compiled, so nobody waits
        compile_later(new)
        return new

    loaded.compile_job = job
