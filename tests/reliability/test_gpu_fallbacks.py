"""The GPU decode path and the batch stack, checked without a GPU.

On CUDA with gpu_decode, plain JPEGs are decoded by nvJPEG on the device and everything else
(PNG, CMYK, EXIF-rotated, raw tensors) on the CPU, so one batch can hold tensors on two devices;
torch.stack refuses that, and the worker stacked a batch whose first image was on the CPU into
pinned host memory, failing the whole batch with INTERNAL. And a JPEG whose EXIF block Pillow
cannot parse raised SyntaxError out of the GPU path (INTERNAL), although the CPU decoder reads
the image fine.

Here the decode thread's "GPU" is the CPU (torchvision's decode_jpeg decodes on whatever device
it is given), so prepare.py's GPU path runs for real, and "meta" tensors stand in for a second
device in the stack. What needs CUDA itself (pinned memory, record_stream, nvJPEG) is in
tests/test_gpu.py, which runs only where a GPU is.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import encode, photo

from layertap.server import codec, prepare
from layertap.server.devices import stack_batch
from layertap.server.errors import ImageLimitExceeded
from layertap.server.preprocess import Preprocessing
from layertap.server.spec import ImageInput
from layertap.server.worker import ModelRuntime

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SPEC = Preprocessing(72, (64, 64), *IMAGENET)
LIMITS = codec.DecodeLimits(max_encoded_bytes=1 << 24, max_pixels=1 << 24)


def bad_exif_jpeg() -> bytes:
    """A JPEG with a DPI in its JFIF header and an APP1 "Exif" block whose TIFF header is not
    one: Pillow's getexif() raises SyntaxError (with no DPI in JFIF, Pillow's own open reads
    the EXIF first and swallows the error). libjpeg ignores the block."""
    rgb = photo("coffee")[::4, ::4].copy()
    jpeg = encode(rgb, "JPEG", quality=90, dpi=(72, 72))
    payload = b"Exif\x00\x00XX*\x00\x08\x00\x00\x00"
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:20] + app1 + jpeg[20:]  # after the 18-byte JFIF APP0


class _NoStream:
    def synchronize(self) -> None:
        pass


@pytest.fixture
def gpu_path_on_cpu() -> Iterator[None]:
    """This thread decodes as a GPU decode thread would, with the CPU as the device."""
    saved = prepare._thread.device, prepare._thread.stream
    prepare._thread.device, prepare._thread.stream = torch.device("cpu"), _NoStream()
    try:
        yield
    finally:
        prepare._thread.device, prepare._thread.stream = saved


def cpu_prepared(data: bytes) -> torch.Tensor:
    saved = prepare._thread.device
    prepare._thread.device = None
    try:
        return prepare.prepare_image(ImageInput(encoded=data), LIMITS, SPEC).tensor
    finally:
        prepare._thread.device = saved


def test_the_gpu_path_runs_here(gpu_path_on_cpu: None) -> None:
    """The premise: a plain JPEG goes through decode_jpeg_cuda and the GPU preprocessing."""
    calls: list[Any] = []
    real = codec.decode_jpeg_cuda

    def spy(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    data = encode(photo("chelsea")[::4, ::4].copy(), "JPEG", quality=90)
    original = prepare.codec.decode_jpeg_cuda
    prepare.codec.decode_jpeg_cuda = spy  # type: ignore[assignment]
    try:
        got = prepare.prepare_image(ImageInput(encoded=data), LIMITS, SPEC).tensor
    finally:
        prepare.codec.decode_jpeg_cuda = original  # type: ignore[assignment]
    assert len(calls) == 1
    torch.testing.assert_close(got, cpu_prepared(data))


def test_malformed_exif_on_the_gpu_path_is_decoded_on_the_cpu(gpu_path_on_cpu: None) -> None:
    data = bad_exif_jpeg()
    # the CPU decoder reads it; before the fix the GPU path raised SyntaxError (INTERNAL)
    assert codec.decode_jpeg_cuda(data, LIMITS, torch.device("cpu")) is None
    got = prepare.prepare_image(ImageInput(encoded=data), LIMITS, SPEC).tensor
    torch.testing.assert_close(got, cpu_prepared(data))


def test_a_failing_gpu_decode_falls_back_to_the_cpu(
    gpu_path_on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nvJPEG's own failure, or a CUDA error in the preprocessing on the device: that image is
    decoded and preprocessed on the CPU instead (before: the error failed the request)."""
    data = encode(photo("astronaut")[::4, ::4].copy(), "JPEG", quality=90)
    expected = cpu_prepared(data)

    def nvjpeg_fails(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("nvjpeg: NVJPEG_STATUS_EXECUTION_FAILED")

    with monkeypatch.context() as patch:
        patch.setattr(codec, "decode_jpeg", nvjpeg_fails)
        got = prepare.prepare_image(ImageInput(encoded=data), LIMITS, SPEC).tensor
    torch.testing.assert_close(got, expected)

    real_preprocess = prepare.preprocess
    calls: list[int] = []

    def fails_on_the_gpu_path(pixels: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_preprocess(pixels, *args)

    monkeypatch.setattr(prepare, "preprocess", fails_on_the_gpu_path)
    got = prepare.prepare_image(ImageInput(encoded=data), LIMITS, SPEC).tensor
    torch.testing.assert_close(got, expected)
    assert len(calls) == 2  # the failed one on the GPU path, then the CPU's


def test_a_limit_on_the_gpu_path_is_still_a_limit(gpu_path_on_cpu: None) -> None:
    data = encode(photo("astronaut"), "JPEG", quality=90)
    small = codec.DecodeLimits(max_encoded_bytes=1 << 24, max_pixels=1000)
    with pytest.raises(ImageLimitExceeded, match="pixels"):
        prepare.prepare_image(ImageInput(encoded=data), small, SPEC)


# --------------------------------------------------------------------------- the batch stack
def _items(*tensors: torch.Tensor) -> list[Any]:
    return [SimpleNamespace(tensor=t) for t in tensors]


def test_a_batch_of_images_on_two_devices_is_stacked_on_the_worker_device() -> None:
    """ "meta" stands in for the worker's device, the CPU for the other one; in either order.
    Before the fix: 'Expected all tensors to be on the same device' (the batch's INTERNAL)."""
    host = torch.rand(3, 8, 8)
    there = torch.empty(3, 8, 8, device="meta")
    worker = SimpleNamespace(device=torch.device("meta"))
    for items in (_items(host, there, host), _items(there, host, there)):
        batch = ModelRuntime._stack(worker, items)  # type: ignore[arg-type]
        assert batch.device.type == "meta" and tuple(batch.shape) == (3, 3, 8, 8)


def test_a_batch_on_one_device_is_stacked_as_before() -> None:
    images = [torch.rand(3, 8, 8) for _ in range(3)]
    batch = stack_batch(images, torch.device("cpu"))
    torch.testing.assert_close(batch, torch.stack(images))
    meta = [torch.empty(3, 8, 8, device="meta") for _ in range(2)]
    assert stack_batch(meta, torch.device("meta")).device.type == "meta"


def test_the_jpeg_fixture_is_what_it_says() -> None:
    from PIL import Image

    data = bad_exif_jpeg()
    with Image.open(io.BytesIO(data)) as im, pytest.raises(SyntaxError):
        im.getexif()
    assert codec.decode_encoded(data, LIMITS).shape[0] == 3
