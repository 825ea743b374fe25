"""Tracing from several worker threads at once (several devices load their models together).

torch.fx's tracer patches torch.nn.Module.__call__ and __getattr__ on the class for the
length of a trace; two traces overlapping in two threads can restore each other's wrappers
and leave the class patched for good, after which every forward in the process goes through
a dead tracer. build_catalog serialises its traces (catalog._TRACE_LOCK)."""

from __future__ import annotations

import threading

import torch
import torchvision
from factories import tiny_net

from layertap.server.catalog import build_catalog


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
