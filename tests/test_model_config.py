"""Model entries: local weight files, factories, tracer settings, preprocessing overrides."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import RunningServer, photo, start_server

from layertap.client import FeatureClient, FeatureServiceError
from layertap.server.models import sha256_file
from layertap.server.settings import ModelConfig, Settings


@pytest.fixture(scope="module")
def config_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    model = torchvision.models.get_model("squeezenet1_1")
    save_file(model.state_dict(), folder / "squeeze.safetensors")
    settings = Settings(
        port=0,
        models=(
            ModelConfig(
                name="squeeze",
                arch="squeezenet1_1",
                weights=str(folder / "squeeze.safetensors"),
                input_size=(160, 160),
            ),
            ModelConfig(
                name="gated-untraceable",
                factory="factories:gated_net",
                weights="none",
                allow_random=True,
                extraction="fx",  # "auto" would fall back to forward hooks (tests/test_hooks.py)
            ),
            ModelConfig(
                name="gated",
                factory="factories:gated_net",
                weights="none",
                allow_random=True,
                leaf_modules=("factories:Gate",),
            ),
            ModelConfig(name="strict", arch="resnet18", weights="none"),
            ModelConfig(
                name="squeeze-exact",
                arch="squeezenet1_1",
                weights=str(folder / "squeeze.safetensors"),
                input_size=(160, 160),
                resize_kernel="float",
            ),
        ),
    )
    running = start_server(settings)
    running.folder = folder  # type: ignore[attr-defined]
    running.model = model  # type: ignore[attr-defined]
    yield running
    running.stop()


def test_safetensors_weights_and_preprocessing_override(config_server: RunningServer) -> None:
    folder: Path = config_server.folder  # type: ignore[attr-defined]
    with FeatureClient(config_server.target) as client:
        info = {m.name: m for m in client.list_models()}["squeeze"]
        assert info.weights == "squeeze.safetensors"
        assert info.weights_sha256 == sha256_file(folder / "squeeze.safetensors")
        assert tuple(info.input_size) == (160, 160)
        x = np.random.default_rng(0).standard_normal((1, 3, 160, 160)).astype(np.float32)
        out = client.extract(x, model="squeeze", nodes="features.12")
    model = config_server.model.eval()  # type: ignore[attr-defined]
    with torch.inference_mode():
        ref = model.features(torch.from_numpy(x))
    np.testing.assert_allclose(out["features.12"], ref.numpy(), atol=1e-4)


def test_untraceable_model_reports_why_and_leaf_modules_fix_it(
    config_server: RunningServer,
) -> None:
    import grpc

    with FeatureClient(config_server.target) as client:
        models = {m.name: m for m in client.list_models()}
        assert not models["gated-untraceable"].ready
        assert "leaf_modules" in models["gated-untraceable"].status_message
        with pytest.raises(FeatureServiceError) as info:
            client.extract(photo("coffee"), model="gated-untraceable", nodes="conv")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert models["gated"].ready
        names = client.describe("gated").node_names
        assert names == ["conv", "gate", "mean", "head"]
        out = client.extract(photo("coffee"), model="gated", nodes=["gate", "conv"])
        conv, gate = out["conv"], out["gate"]
        expected = conv * 2 if conv.mean() > 0 else -conv
        np.testing.assert_allclose(gate, expected, atol=1e-5)


def test_weights_none_without_allow_random_is_refused(config_server: RunningServer) -> None:
    with FeatureClient(config_server.target) as client:
        strict = {m.name: m for m in client.list_models()}["strict"]
    assert not strict.ready and "allow_random" in strict.status_message


def test_entries_with_the_same_weights_share_one_base_model(resnet18_weights: Path) -> None:
    settings = Settings(
        port=0,
        models=(
            ModelConfig(name="r18-224", arch="resnet18", weights=str(resnet18_weights)),
            ModelConfig(
                name="r18-320",
                arch="resnet18",
                weights=str(resnet18_weights),
                input_size=(320, 320),
            ),
        ),
    )
    running = start_server(settings)
    try:
        runtime = running.server.runtime
        small, large = runtime.model("r18-224"), runtime.model("r18-320")
        assert small.weights.module is large.weights.module
        assert small.catalog.by_name["layer4.1.relu_1"].shape == (1, 512, 7, 7)
        assert large.catalog.by_name["layer4.1.relu_1"].shape == (1, 512, 10, 10)
        with FeatureClient(running.target) as client:
            a = client.extract(photo("chelsea"), model="r18-224", nodes="layer4")
            b = client.extract(photo("chelsea"), model="r18-320", nodes="layer4")
        assert a["layer4"].shape == (1, 512, 7, 7) and b["layer4"].shape == (1, 512, 10, 10)
    finally:
        running.stop()


# squeezenet1_1's preset (ImageNet mean/std, bilinear, antialiased) at the entries' input_size
# (160, 160): crop 160, resized first to round(160 * 256 / 224) = 183, torchvision's ratio
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CROP, RESIZE = 160, 183


def test_resize_kernel_uint8_by_default_float_on_request(config_server: RunningServer) -> None:
    """Encoded photos are resized with torchvision v2's uint8 kernel unless the entry asks for
    the float kernel (weights.transforms() on tensors); DescribeModel says which. The reference
    preprocessing is torchvision's own, with the values above written here, not what the server
    reports: a wrong size, mean or std fails, whatever the server says about it."""
    import io

    import torchvision.transforms.v2 as T
    from PIL import Image

    pixels = photo("chelsea")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")  # lossless: both sides see the same pixels
    model = config_server.model.eval()  # type: ignore[attr-defined]
    img = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    references = {
        # torchvision v2 on a uint8 tensor: its native uint8 antialiased resize
        "squeeze": T.Compose(
            [
                T.Resize(RESIZE, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                T.CenterCrop(CROP),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        ),
        # the weights' own preset (v1 resize in float), at this crop and resize
        "squeeze-exact": torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1.transforms(
            crop_size=CROP, resize_size=RESIZE
        ),
    }
    maps: dict[str, np.ndarray] = {}
    with FeatureClient(config_server.target) as client:
        infos = {m.name: m for m in client.list_models()}
        for name, kernel in (("squeeze", "uint8"), ("squeeze-exact", "float")):
            p = infos[name].preprocessing
            assert p.resize_kernel == kernel
            assert client.describe(name).model.preprocessing.resize_kernel == kernel
            # what the server reports is what it does (checked below against torchvision)
            assert (p.resize_size, tuple(p.crop_size)) == (RESIZE, (CROP, CROP))
            np.testing.assert_allclose(p.mean, IMAGENET_MEAN, rtol=1e-6)
            np.testing.assert_allclose(p.std, IMAGENET_STD, rtol=1e-6)
            x = references[name](img)
            assert x.dtype == torch.float32 and tuple(x.shape) == (3, CROP, CROP)
            out = client.extract([buf.getvalue()], model=name, nodes="features.0")  # first conv
            with torch.inference_mode():
                ref = model.features[0](x[None])
            np.testing.assert_allclose(out["features.0"], ref.numpy(), atol=2e-5, rtol=1e-5)
            maps[name] = out["features.0"]
    # the kernels differ by at most one uint8 level: visible in the first conv, not more
    gap = float(np.abs(maps["squeeze"] - maps["squeeze-exact"]).max())
    assert 1e-3 < gap < 0.5
