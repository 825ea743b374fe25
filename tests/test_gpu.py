"""CUDA checks: run where a GPU exists (`pytest -m gpu`); elsewhere they are reported skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import photo, start_server

from layertap.client import FeatureClient
from layertap.server.settings import ModelConfig, Settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_features_match_cpu(resnet18_weights: Path) -> None:
    settings = Settings(
        port=0,
        device="auto",
        models=(ModelConfig(name="r18", arch="resnet18", weights=str(resnet18_weights)),),
    )
    running = start_server(settings)
    try:
        with FeatureClient(running.target) as client:
            info = client.list_models()[0]
            assert info.device.startswith("cuda")
            x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
            out = client.extract([x, x], model="r18", nodes=["layer3", "fc"])
    finally:
        running.stop()
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(resnet18_weights, weights_only=True))
    with torch.inference_mode():
        ref = model.eval()(torch.from_numpy(x))
    np.testing.assert_allclose(out["fc"][0], ref[0].numpy(), rtol=1e-2, atol=1e-2)
    assert out["layer3"].shape == (2, 256, 14, 14)


def test_cuda_serves_real_photos_concurrently(resnet18_weights: Path) -> None:
    settings = Settings(
        port=0,
        models=(ModelConfig(name="r18", arch="resnet18", weights=str(resnet18_weights)),),
    )
    running = start_server(settings)
    try:
        with FeatureClient(running.target) as client:
            out = client.extract(
                [photo("astronaut"), photo("chelsea")],
                model="r18",
                nodes="layer4",
                pool="gem",
                normalize=True,
            )
        assert out["layer4"].shape == (2, 512)
        assert out.metadata.device.startswith("cuda")
    finally:
        running.stop()


def _jpeg_features(settings: Settings) -> tuple[np.ndarray, str]:
    from conftest import encode

    running = start_server(settings)
    try:
        with FeatureClient(running.target) as client:
            images = [encode(photo("astronaut")), encode(photo("chelsea"))]
            out = client.extract(images, model="r18", nodes="layer4", pool="avg")
        return out["layer4"], out.metadata.device
    finally:
        running.stop()


def test_gpu_jpeg_decode_matches_cpu_decode(resnet18_weights: Path) -> None:
    """nvJPEG (decode pool, own CUDA stream) vs libjpeg-turbo: the same features up to the
    decoders' rounding differences; the batch is then already on the GPU (no pinned copy)."""
    model = ModelConfig(name="r18", arch="resnet18", weights=str(resnet18_weights))
    on, device = _jpeg_features(Settings(port=0, gpu_decode="on", models=(model,)))
    off, _ = _jpeg_features(Settings(port=0, gpu_decode="off", models=(model,)))
    assert device.startswith("cuda")
    cosine = (on * off).sum(1) / (np.linalg.norm(on, axis=1) * np.linalg.norm(off, axis=1))
    assert cosine.min() > 0.999, cosine


def test_gpu_decode_tensor_is_on_the_device_and_complete() -> None:
    from conftest import encode

    from layertap.server import codec
    from layertap.server.prepare import init_decode_thread, prepare_image
    from layertap.server.preprocess import Preprocessing
    from layertap.server.spec import ImageInput

    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    spec = Preprocessing(256, (224, 224), *imagenet)
    data = encode(photo("coffee"))
    limits = codec.DecodeLimits(max_encoded_bytes=1 << 24, max_pixels=1 << 26)
    init_decode_thread("cuda:0")
    try:
        gpu = prepare_image(ImageInput(encoded=data), limits, spec).tensor
    finally:
        init_decode_thread(None)  # this thread back to CPU decode
    cpu = prepare_image(ImageInput(encoded=data), limits, spec).tensor
    assert gpu.is_cuda and not cpu.is_cuda
    assert (gpu.cpu() - cpu).abs().mean() < 0.05


def test_two_workers_on_cuda_and_float16_autocast(resnet18_weights: Path) -> None:
    weights = str(resnet18_weights)
    settings = Settings(
        port=0,
        devices=("cuda:0", "cuda:0"),
        models=(
            ModelConfig(name="r18", arch="resnet18", weights=weights, channels_last=True),
            ModelConfig(name="r18-fp16", arch="resnet18", weights=weights, autocast="float16"),
        ),
    )
    running = start_server(settings)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    try:
        with FeatureClient(running.target) as client:
            infos = {m.name: m for m in client.list_models()}
            full = client.extract([x, x], model="r18", nodes="fc")
            half = client.extract([x, x], model="r18-fp16", nodes="fc")
    finally:
        running.stop()
    assert infos["r18-fp16"].compute_dtype == "float16" and infos["r18-fp16"].ready
    assert full.metadata.device in ("cuda:0/0", "cuda:0/1")
    assert half["fc"].dtype == np.float32
    np.testing.assert_allclose(half["fc"], full["fc"], rtol=0.05, atol=0.05)


# --- mixed-device batches and GPU decode fallbacks (tests/reliability/test_gpu_fallbacks.py
# checks the same logic on the CPU) ------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_stack_batch_mixes_cuda_and_cpu_images(device: str) -> None:
    """A batch of nvJPEG-decoded (CUDA) and CPU-decoded images, in either order, is stacked on
    the worker's device; all-CPU batches still go through pinned memory."""
    from layertap.server.devices import stack_batch

    host = [torch.rand(3, 16, 16) for _ in range(3)]
    expected = torch.stack(host).to("cuda:0")
    on_gpu = [t.to("cuda:0") for t in host]
    for tensors in ([host[0], on_gpu[1], host[2]], [on_gpu[0], host[1], on_gpu[2]], host):
        batch = stack_batch(tensors, torch.device(device))
        assert batch.device == torch.device("cuda:0")
        torch.testing.assert_close(batch, expected)


def _bad_exif_jpeg() -> bytes:
    """A JPEG (JFIF with a DPI) whose APP1 EXIF block is not TIFF: Pillow's getexif() raises."""
    import struct

    from conftest import encode

    jpeg = encode(photo("coffee"), "JPEG", quality=90, dpi=(72, 72))
    payload = b"Exif\x00\x00XX*\x00\x08\x00\x00\x00"
    return jpeg[:20] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[20:]


def _cmyk_jpeg(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _mixed_images() -> list[bytes]:
    """Same-sized model inputs from the CPU decoder and nvJPEG, a CPU-decoded one first (the
    order that failed: the batch went to pinned host memory with CUDA tensors in it)."""
    from conftest import encode
    from PIL import Image

    rgb = photo("chelsea")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: decoded on the CPU
    return [
        encode(rgb, "PNG"),  # CPU
        encode(photo("astronaut"), "JPEG", quality=90),  # nvJPEG
        encode(rgb, "JPEG", quality=90, exif=exif.tobytes()),  # CPU (EXIF-rotated)
        _cmyk_jpeg(rgb),  # CPU
        _bad_exif_jpeg(),  # was: SyntaxError out of the GPU path; now the CPU decodes it
        encode(photo("rocket"), "JPEG", quality=90),  # nvJPEG
    ]


def test_gpu_decode_batch_mixing_nvjpeg_and_cpu_decoded_images(resnet18_weights: Path) -> None:
    """One request (so one batch: same model input shape) of images decoded on both devices is
    answered, with the features of the same images decoded on the CPU."""
    images = _mixed_images()
    model = ModelConfig(name="r18", arch="resnet18", weights=str(resnet18_weights))
    answers = {}
    for mode in ("on", "off"):
        running = start_server(
            Settings(port=0, gpu_decode=mode, max_batch_size=8, max_wait_ms=50, models=(model,))
        )
        try:
            with FeatureClient(running.target) as client:
                out = client.extract(images, model="r18", nodes="layer4", pool="avg")
            assert out.metadata.device.startswith("cuda")
            answers[mode] = out["layer4"]
        finally:
            running.stop()
    on, off = answers["on"], answers["off"]
    cosine = (on * off).sum(1) / (np.linalg.norm(on, axis=1) * np.linalg.norm(off, axis=1))
    assert cosine.min() > 0.999, cosine


def test_gpu_path_decodes_a_jpeg_with_unreadable_exif_on_the_cpu() -> None:
    from layertap.server import codec
    from layertap.server.prepare import init_decode_thread, prepare_image
    from layertap.server.preprocess import Preprocessing
    from layertap.server.spec import ImageInput

    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    spec = Preprocessing(256, (224, 224), *imagenet)
    limits = codec.DecodeLimits(max_encoded_bytes=1 << 24, max_pixels=1 << 26)
    data = _bad_exif_jpeg()
    assert codec.decode_jpeg_cuda(data, limits, torch.device("cuda:0")) is None
    init_decode_thread("cuda:0")
    try:
        gpu_thread = prepare_image(ImageInput(encoded=data), limits, spec).tensor
    finally:
        init_decode_thread(None)
    cpu = prepare_image(ImageInput(encoded=data), limits, spec).tensor
    assert not gpu_thread.is_cuda  # the fallback decoded it on the CPU
    torch.testing.assert_close(gpu_thread, cpu)
