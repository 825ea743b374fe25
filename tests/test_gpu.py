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
