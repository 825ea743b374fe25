"""Devices and threads: which device a worker runs on, how many torch threads it gets, what it
reports to metrics, and how a batch's images (CPU- or GPU-decoded) become one tensor there."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .models import ModelLoadError
from .settings import Settings


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` is on `device` ("cuda" without an index: the current CUDA device)."""
    if tensor.device.type != device.type:
        return False
    if device.index is None and device.type == "cuda":
        return tensor.device.index == torch.cuda.current_device()
    return device.index is None or tensor.device.index == device.index


def stack_batch(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A batch's images as one tensor on `device`, wherever each image is: on CUDA a batch can
    mix nvJPEG-decoded images (already on the device) with CPU-decoded ones (PNG, CMYK,
    EXIF-rotated JPEGs, raw tensors, or a GPU decode that fell back), and torch.stack refuses
    tensors on different devices. All from the CPU: stacked straight into pinned host memory,
    then one asynchronous copy (ordered before the forward on the same stream; the results'
    .cpu() at the end waits for both). Otherwise each image not on the device is copied there;
    the ones already there are marked as used by this stream, so the decode stream that made
    them cannot reuse their memory early."""
    on_device = [_on(t, device) for t in tensors]
    if device.type == "cuda" and all(t.device.type == "cpu" for t in tensors):
        pinned = torch.empty((len(tensors), *tensors[0].shape), pin_memory=True)
        torch.stack(list(tensors), out=pinned)
        return pinned.to(device, non_blocking=True)
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        for t, there in zip(tensors, on_device, strict=True):
            if there:
                t.record_stream(stream)
    return torch.stack(
        [t if there else t.to(device) for t, there in zip(tensors, on_device, strict=True)]
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available")
    return device


def torch_versions() -> tuple[str, str]:
    """(torch, torchvision) versions, for the build-info metric."""
    import torchvision

    return torch.__version__, torchvision.__version__


def cuda_memory(device: str) -> tuple[float, float]:
    """(allocated, reserved) CUDA bytes of one device, for the metrics scrape."""
    return float(torch.cuda.memory_allocated(device)), float(torch.cuda.memory_reserved(device))


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_torch_threads(settings: Settings, cpu_workers: int = 1) -> int:
    """Intra-op threads per worker: torch_threads when set, else the usable cores split between
    the CPU workers (at least 1), so N workers never run N x cores threads. The decode pool's
    threads run torch single-threaded (prepare.init_decode_thread) and are busy a small share
    of the time (decode is a few ms per image, the forward tens), so they are not subtracted."""
    if settings.torch_threads > 0:
        return settings.torch_threads
    return max(1, usable_cores() // max(1, cpu_workers))
