"""Per-model settings no other test sets, each observed in what the server computes.

- `interpolation`, `mean`, `std`: the model input the server builds from a real photo, read
  back through probe_net's `probe` node (an identity leaf that returns its input), equals
  torchvision's own transform with those values, and differs from the default's.
- `autowrap_functions`: a model calling a function with data-dependent control flow traces
  (extraction = "fx") only with that function listed, and the opaque node's values are right.
- `prefix_tokens`: the token count the `mean` pool skips on NLC outputs (and ListModels'
  prefix_tokens), against a model whose auto value is 0.
- `fold_batchnorm = false`: no BatchNorm is folded, and a resnet18's served maps are torchvision's
  own forward bit for bit (folded: equal to float32 rounding only).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import factories
import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as F2
from conftest import RunningServer, photo, start_server
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from layertap.client import FeatureClient
from layertap.server.models import IMAGENET_MEAN, IMAGENET_STD
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

SIZE = 32
RESIZE = round(SIZE * 256 / 224)  # the default resize for an input_size override: 37
MEAN = (0.5, 0.25, 0.75)
STD = (0.2, 0.3, 0.4)
TOKEN_SIZE = 32  # TokenNet: 8x8 patches -> 16 patch tokens after 2 extra ones


def _input_probe(name: str, **kwargs: object) -> ModelConfig:
    return ModelConfig(
        name=name,
        factory="factories:probe_net",
        kwargs={"tag": f"overrides-{name}"},
        weights="none",
        allow_random=True,
        input_size=(SIZE, SIZE),
        leaf_modules=("factories:Probe",),
        **kwargs,  # type: ignore[arg-type]
    )


def _factory(name: str, factory: str, **kwargs: object) -> ModelConfig:
    return ModelConfig(
        name=name,
        factory=factory,
        weights="none",
        allow_random=True,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def server(resnet18_weights: Path) -> Iterator[RunningServer]:
    r18 = {"arch": "resnet18", "weights": str(resnet18_weights), "input_size": (SIZE, SIZE)}
    settings = Settings(
        port=0,
        metrics=False,
        models=(
            _input_probe("default"),
            _input_probe("bicubic", interpolation="bicubic"),
            _input_probe("nearest", interpolation="nearest"),
            _input_probe("bicubic-float", interpolation="bicubic", resize_kernel="float"),
            _input_probe("normalised", mean=MEAN, std=STD),
            _input_probe("squash", resize_mode="squash", resize_kernel="float"),
            _factory(
                "gate",
                "factories:autowrap_net",
                input_size=(16, 16),
                extraction="fx",
                autowrap_functions=("factories:opaque_gate",),
            ),
            _factory(
                "gate-unlisted", "factories:autowrap_net", input_size=(16, 16), extraction="fx"
            ),
            _factory(
                "tokens",
                "factories:token_net",
                input_size=(TOKEN_SIZE, TOKEN_SIZE),
                prefix_tokens=2,
            ),
            _factory("tokens-auto", "factories:token_net", input_size=(TOKEN_SIZE, TOKEN_SIZE)),
            ModelConfig(name="r18-unfolded", fold_batchnorm=False, channels_last=False, **r18),
            ModelConfig(name="r18-folded", channels_last=False, **r18),
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


def _photo() -> np.ndarray:
    """A real photo, not square, with fine detail (whiskers) that the kernels treat differently."""
    return np.ascontiguousarray(photo("chelsea")[60:210, 120:330])


def _array(tensor: pb.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, np.float32).reshape(tuple(tensor.shape))


def _served_input(server: RunningServer, model: str, image: np.ndarray) -> np.ndarray:
    """The model input the server built: the probe node returns its input as it is."""
    raw = pb.Tensor(dtype="uint8", shape=list(image.shape), data=image.tobytes())
    request = pb.ExtractRequest(model=model, images=[pb.Image(tensor=raw)], nodes=["probe"])
    (out,) = server.stub().Extract(request, timeout=60).results[0].outputs
    return _array(out.tensor)


def _torchvision_input(
    image: np.ndarray,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> np.ndarray:
    """torchvision v2 on the uint8 tensor: resize (antialiased), centre crop, scale, normalise."""
    x = torch.from_numpy(image).permute(2, 0, 1)
    x = F2.resize(x, [RESIZE], interpolation=interpolation, antialias=True)
    x = F2.center_crop(x, [SIZE, SIZE])
    x = F2.to_dtype(x, torch.float32, scale=True)
    return F2.normalize(x, list(mean), list(std)).numpy()


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _assert_different(got: np.ndarray, other: np.ndarray) -> None:
    assert got.shape == other.shape
    assert float(np.abs(got - other).max()) > 0.1, "no visible difference: was it applied?"


@pytest.mark.parametrize(
    ("model", "mode"),
    [("bicubic", InterpolationMode.BICUBIC), ("nearest", InterpolationMode.NEAREST)],
)
def test_interpolation_override(server: RunningServer, model: str, mode: InterpolationMode) -> None:
    image = _photo()
    default = _served_input(server, "default", image)
    _assert_same(default, _torchvision_input(image))  # bilinear, the default
    got = _served_input(server, model, image)
    _assert_same(got, _torchvision_input(image, mode))
    _assert_different(got, default)
    with FeatureClient(server.target) as client:
        info = {m.name: m for m in client.list_models()}
    assert info[model].preprocessing.interpolation == mode.value
    assert info["default"].preprocessing.interpolation == "bilinear"


def test_interpolation_with_the_float_kernel_is_weights_transforms_bit_for_bit(
    server: RunningServer,
) -> None:
    image = _photo()
    preset = ImageClassification(
        crop_size=SIZE, resize_size=RESIZE, interpolation=InterpolationMode.BICUBIC
    )
    want = preset(torch.from_numpy(image).permute(2, 0, 1)).numpy()
    np.testing.assert_array_equal(_served_input(server, "bicubic-float", image), want)


def test_resize_mode_squash_resizes_to_the_crop_shape(server: RunningServer) -> None:
    """resize_mode = "squash": the whole photo (210 x 150, not square) resized to 37 x 37, aspect
    not kept, then the 32 x 32 centre crop; reported as such by ListModels."""
    image = _photo()
    x = torch.from_numpy(image).permute(2, 0, 1)
    x = F2.resize(x.float(), [RESIZE, RESIZE], antialias=True).round().clamp(0, 255)
    x = F2.center_crop(x / 255, [SIZE, SIZE])
    expected = F2.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD)).numpy()
    served = _served_input(server, "squash", image)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    _assert_different(served, _served_input(server, "default", image))
    info = {m.name: m for m in server.stub().ListModels(pb.ListModelsRequest()).models}
    assert info["squash"].preprocessing.resize_mode == "squash"
    assert info["default"].preprocessing.resize_mode == "shorter"


def test_mean_and_std_override(server: RunningServer) -> None:
    image = _photo()
    got = _served_input(server, "normalised", image)
    _assert_same(got, _torchvision_input(image, mean=MEAN, std=STD))
    _assert_different(got, _served_input(server, "default", image))
    with FeatureClient(server.target) as client:
        info = {m.name: m for m in client.list_models()}["normalised"]
    np.testing.assert_allclose(info.preprocessing.mean, MEAN, rtol=1e-6)
    np.testing.assert_allclose(info.preprocessing.std, STD, rtol=1e-6)


def test_autowrap_functions_make_an_untraceable_function_one_node(server: RunningServer) -> None:
    with FeatureClient(server.target) as client:
        info = {m.name: m for m in client.list_models()}
    assert not info["gate-unlisted"].ready
    assert "cannot trace" in info["gate-unlisted"].status_message
    assert info["gate"].ready and info["gate"].extraction_mode == "fx"
    nodes = [n.name for n in server.server.runtime.model("gate").catalog.nodes]
    assert nodes == ["conv", "opaque_gate", "mean"]

    model = factories.autowrap_net().eval()  # type: ignore[attr-defined]
    for sign in (1.0, -1.0):  # both branches of the gate
        x = np.full((1, 3, 16, 16), sign, np.float32)
        tensor = pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes())
        request = pb.ExtractRequest(model="gate", images=[pb.Image(tensor=tensor)], nodes=nodes)
        outputs = server.stub().Extract(request, timeout=60).results[0].outputs
        got = {o.key: _array(o.tensor) for o in outputs}
        with torch.inference_mode():
            conv = model.conv(torch.from_numpy(x))
            gated = factories.opaque_gate(conv)  # type: ignore[attr-defined]
        np.testing.assert_allclose(got["opaque_gate"], gated[0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["mean"], gated.mean((2, 3))[0].numpy(), rtol=1e-5, atol=1e-6)


def test_prefix_tokens_are_skipped_by_the_mean_pool(server: RunningServer) -> None:
    x = np.random.default_rng(0).standard_normal((TOKEN_SIZE, TOKEN_SIZE, 3))
    image = np.clip(128 + 60 * x, 0, 255).astype(np.uint8)
    with FeatureClient(server.target) as client:
        info = {m.name: m for m in client.list_models()}
        raw = client.extract(image, model="tokens", nodes="mix")["mix"][0]
        pooled = client.extract(image, model="tokens", nodes="mix", pool="mean")["mix"][0]
        auto = client.extract(image, model="tokens-auto", nodes="mix", pool="mean")["mix"][0]
    assert (info["tokens"].prefix_tokens, info["tokens-auto"].prefix_tokens) == (2, 0)
    assert raw.shape == (18, 6)  # 2 extra tokens + 16 patches
    np.testing.assert_allclose(pooled, raw[2:].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(auto, raw.mean(0), rtol=1e-5, atol=1e-6)  # same weights
    assert float(np.abs(pooled - auto).max()) > 1e-3


def test_fold_batchnorm_false_is_the_models_own_arithmetic(
    server: RunningServer, resnet18_weights: Path
) -> None:
    nodes = ["layer1.0.bn1", "layer2.0.downsample.1", "layer4"]
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(resnet18_weights, weights_only=True))
    model.eval()
    want: dict[str, torch.Tensor] = {}
    for name in nodes:  # module outputs, cloned before in-place ops change them
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: want.__setitem__(name, out.clone())
        )
    x = np.random.default_rng(3).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)

    def forward() -> None:
        with torch.inference_mode():
            model(torch.from_numpy(x))

    # on the server's worker thread: the same torch thread count as the served forward
    server.server.runtime._executor.submit(forward).result(60)
    tensor = pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes())
    served = {}
    for entry in ("r18-unfolded", "r18-folded"):
        request = pb.ExtractRequest(model=entry, images=[pb.Image(tensor=tensor)], nodes=nodes)
        outputs = server.stub().Extract(request, timeout=60).results[0].outputs
        served[entry] = {o.key: _array(o.tensor) for o in outputs}

    runtime = server.server.runtime
    assert not runtime.model("r18-unfolded").folded  # nothing folded, nothing copied
    assert runtime.model("r18-folded").folded
    for node, ref in want.items():
        reference = ref[0].numpy()
        np.testing.assert_array_equal(served["r18-unfolded"][node], reference, err_msg=node)
        scale = float(np.abs(reference).max())
        folded = served["r18-folded"][node]
        np.testing.assert_allclose(folded, reference, rtol=0, atol=1e-5 * scale, err_msg=node)
    assert any(not np.array_equal(served["r18-folded"][n], want[n][0].numpy()) for n in want), (
        "folding changed no value: was anything folded?"
    )
