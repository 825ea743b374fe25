"""Tracing from several worker threads at once (several devices load their models together).

torch.fx's tracer patches torch.nn.Module.__call__ and __getattr__ on the class for the
length of a trace; two traces overlapping in two threads can restore each other's wrappers
and leave the class patched for good, after which every forward in the process goes through
a dead tracer; and a forward run by another thread during a trace enters the tracer's wrapper
and fails. build_catalog holds server/trace_gate.py's gate alone, every forward holds it
shared."""

from __future__ import annotations

import threading

import torch
import torchvision
from factories import tiny_net

from layertap.server.catalog import build_catalog
from layertap.server.trace_gate import forwarding


def test_concurrent_catalog_builds_leave_nn_module_unpatched() -> None:
    call, getattr_ = torch.nn.Module.__call__, torch.nn.Module.__getattr__
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def build() -> None:
        model = torchvision.models.resnet18()  # many modules: a long trace, many patched calls
        try:
            start.wait()
            for _ in range(3):
                build_catalog(model, (64, 64))
        except BaseException as exc:  # reported below, with the patch check
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert torch.nn.Module.__call__ is call
    assert torch.nn.Module.__getattr__ is getattr_
    with torch.inference_mode():  # forwards in this process still work
        assert tiny_net()(torch.zeros(1, 3, 16, 16)).shape == (1, 4)


class _Paused(torch.nn.Module):
    """Pauses a trace halfway (nn.Module's class patched by the tracer) until released."""

    def __init__(self, started: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self.started, self.release = started, release

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            self.started.set()
            assert self.release.wait(30)
        return x + 1


def test_a_forward_in_another_thread_waits_for_a_trace() -> None:
    """What two CPU workers hit when one loads a model while the other warms one up: without
    the gate the forward fails with "module is not installed as a submodule"."""
    started, release = threading.Event(), threading.Event()
    traced = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), _Paused(started, release))
    other = tiny_net().eval()
    results: dict[str, object] = {}

    def trace() -> None:
        results["catalog"] = build_catalog(traced, (16, 16))

    def forward() -> None:
        try:
            with forwarding(), torch.inference_mode():
                results["out"] = other(torch.zeros(1, 3, 16, 16))
        except BaseException as exc:  # reported by the assertion below
            results["error"] = exc

    tracer = threading.Thread(target=trace)
    tracer.start()
    assert started.wait(30)
    runner = threading.Thread(target=forward)
    runner.start()
    runner.join(0.5)
    assert runner.is_alive(), results  # held back while the trace has nn.Module patched
    release.set()
    tracer.join(60)
    runner.join(60)
    assert "error" not in results, results["error"]
    assert isinstance(results["out"], torch.Tensor)
    assert results["catalog"] is not None
