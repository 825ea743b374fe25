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
