"""Served activations equal the in-process model's, for ten torchvision architectures.

One server holds all ten models with seeded random weights saved to files; the test loads the
same files into its own model instances and computes every reference activation independently of
layertap's catalogue/extractor code: forward hooks on modules (capturing ``output.clone()`` at the
moment the module returns, so later in-place ops cannot touch it), or torchvision's
``create_feature_extractor`` on a separate instance for single function nodes (``add``).

Inputs are real photos sent as raw, already-normalised float32 [1, 3, H, W] tensors, so server
preprocessing plays no part: any difference comes from extraction itself.

The saved weights have BatchNorm statistics and affine parameters far from the identity, and no
all-zero weights (conftest.save_random_weights), and every comparison is relative to the
reference's magnitude, which must be non-trivial: a BatchNorm dropped or folded wrongly, or a
layer that comes back as zeros, fails here.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from conftest import RunningServer, photo, relative_error, save_random_weights, start_server
from PIL import Image
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

# Served and reference values differ by float32 rounding only: at most ~3e-6 of the
# reference's largest magnitude here (BatchNorm folding, channels-last kernels, fx vs eager).
# A BatchNorm dropped or folded wrongly moves them by far more, now that the saved weights'
# BatchNorms are not the identity (conftest.save_random_weights).
RTOL = 2e-5
MIN_SCALE = 1e-2  # every reference compared here reaches at least this magnitude
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
PHOTOS = ("astronaut", "chelsea")

# inception_v3 with weights=None warns and runs scipy's slow truncated-normal init unless told;
# the state dict is the same either way (aux_logits stays True, as the server builds it).
KWARGS: dict[str, dict[str, Any]] = {"inception_v3": {"init_weights": False}}
SIZES = {"inception_v3": 299}
# Layouts are pinned so every run checks the same ones (auto would time each model at start-up
# and could pick either): half the convolutional models channels-last, half not; ViT and Swin
# stay unset (auto does not time a model whose only convolution is its patch embedding).
CHANNELS_LAST: dict[str, bool] = {
    "resnet18": False,
    "mobilenet_v2": True,
    "vgg11": True,
    "efficientnet_b0": False,
    "inception_v3": True,
    "convnext_tiny": True,
    "regnet_y_400mf": False,
    "densenet121": True,
}


@dataclass(frozen=True)
class Case:
    requested: str  # the name sent to the server (often truncated)
    node: str  # the full node name it must resolve to
    hook: str | None = None  # module whose output is the reference, or
    fx: str | None = None  # a node computed by torchvision's create_feature_extractor


CASES: dict[str, list[Case]] = {
    "resnet18": [
        Case("layer1", "layer1.1.relu_1", hook="layer1"),
        Case("layer2.0.downsample", "layer2.0.downsample.1", hook="layer2.0.downsample"),
        Case("layer3", "layer3.1.relu_1", hook="layer3"),
        Case("fc", "fc", hook="fc"),
    ],
    "mobilenet_v2": [
        Case("features.3.add", "features.3.add", fx="features.3.add"),
        Case("features.4", "features.4.conv.3", hook="features.4"),
        Case("features.18", "features.18", hook="features.18"),
        Case("classifier", "classifier.1", hook="classifier"),
    ],
    "vgg11": [
        # conv followed by ReLU(inplace=True): must come back pre-ReLU
        Case("features.4", "features.4", hook="features.4"),
        Case("features.10", "features.10", hook="features.10"),
        Case("classifier.3", "classifier.3", hook="classifier.3"),
        Case("classifier", "classifier.6", hook="classifier"),
    ],
    "vit_b_16": [
        Case("conv_proj", "conv_proj", hook="conv_proj"),
        Case(
            "encoder.layers.encoder_layer_5.mlp",
            "encoder.layers.encoder_layer_5.mlp",
            hook="encoder.layers.encoder_layer_5.mlp",
        ),
        Case(
            "encoder.layers.encoder_layer_11",
            "encoder.layers.encoder_layer_11.add_1",
            hook="encoder.layers.encoder_layer_11",
        ),
        Case("heads", "heads.head", hook="heads"),
    ],
    "swin_t": [
        Case("features.0", "features.0.2", hook="features.0"),
        Case("features.3", "features.3.1.add_1", hook="features.3"),
        Case("features.7", "features.7.1.add_1", hook="features.7"),
        Case("norm", "norm", hook="norm"),
    ],
    "efficientnet_b0": [
        Case("features.2", "features.2.1.add", hook="features.2"),
        Case("features.5.1.add", "features.5.1.add", fx="features.5.1.add"),
        Case("features.8", "features.8", hook="features.8"),
        Case("classifier", "classifier.1", hook="classifier"),
    ],
    "inception_v3": [
        Case("Conv2d_2b_3x3", "Conv2d_2b_3x3.relu", hook="Conv2d_2b_3x3"),
        Case("Mixed_5d", "Mixed_5d.cat", hook="Mixed_5d"),
        Case("Mixed_6e", "Mixed_6e.cat", hook="Mixed_6e"),
        Case("Mixed_7c", "Mixed_7c.cat_2", hook="Mixed_7c"),
    ],
    "convnext_tiny": [
        Case("features.1", "features.1.2.add", hook="features.1"),
        Case("features.4", "features.4.1", hook="features.4"),
        Case("features.7", "features.7.2.add", hook="features.7"),
        Case("classifier", "classifier.2", hook="classifier"),
    ],
    "regnet_y_400mf": [
        Case("stem", "stem", hook="stem"),
        Case(
            "trunk_output.block2",
            "trunk_output.block2.block2-2.activation",
            hook="trunk_output.block2",
        ),
        Case(
            "trunk_output.block4.block4-3",
            "trunk_output.block4.block4-3.activation",
            hook="trunk_output.block4.block4-3",
        ),
        Case("fc", "fc", hook="fc"),
    ],
    "densenet121": [
        Case("features.denseblock1", "features.denseblock1.cat", hook="features.denseblock1"),
        Case("features.transition2", "features.transition2.pool", hook="features.transition2"),
        # BatchNorm followed by F.relu(inplace=True) in DenseNet.forward: must stay pre-ReLU
        Case("features.norm5", "features.norm5", hook="features.norm5"),
        Case("classifier", "classifier", hook="classifier"),
    ],
}
ARCHS = list(CASES)


# Served again with fold_batchnorm = false, where the values must equal the model's own forward
# bit for bit: BatchNorm after a convolution in a plain module (resnet18), in torchvision's
# Conv2dNormActivation and depthwise convolutions (mobilenet_v2), before a convolution
# (densenet121).
UNFOLDED = ("resnet18", "mobilenet_v2", "densenet121")
# The unfolded server's worker and the bit-for-bit reference run with this many torch threads:
# a convolution's last bits depend on how its work is split between threads.
UNFOLDED_THREADS = 2


def with_torch_threads(n: int, fn: Callable[[], Any]) -> Any:
    """fn() on a fresh thread whose torch intra-op thread count is n, whatever any other
    thread of the test process has set (ATen fixes a thread's count at its first parallel op,
    from the last set_num_threads of any thread: set it, then read it at once)."""
    out: dict[str, Any] = {}

    def run() -> None:
        torch.set_num_threads(n)
        assert torch.get_num_threads() == n
        out["value"] = fn()

    thread = threading.Thread(target=run, name=f"reference-{n}-threads")
    thread.start()
    thread.join()
    assert "value" in out, "the reference forward failed (see the thread's traceback above)"
    return out["value"]


# --- helpers -----------------------------------------------------------------------------------
def input_batch(size: int) -> np.ndarray:
    """The real photos, resized to size x size and ImageNet-normalised: float32 [N, 3, S, S]."""
    out = []
    for name in PHOTOS:
        img = Image.fromarray(photo(name)).resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out.append((arr - MEAN) / STD)
    return np.ascontiguousarray(np.stack(out).astype(np.float32))


def raw_images(batch: np.ndarray) -> list[pb.Image]:
    return [
        pb.Image(tensor=pb.Tensor(dtype="float32", shape=[1, *x.shape], data=x.tobytes()))
        for x in batch
    ]


def to_array(t: pb.Tensor) -> np.ndarray:
    assert t.dtype == "float32", t.dtype
    return np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape))


def reference_model(arch: str, path: Path) -> nn.Module:
    """A fresh instance with the saved weights (meta init + assign; real init if meta fails)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(arch, weights=None, **KWARGS.get(arch, {}))
        model.load_state_dict(state, assign=True)
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            raise RuntimeError("meta tensors left after load")
    except (NotImplementedError, RuntimeError):  # regnet computes its widths with .tolist()
        model = torchvision.models.get_model(arch, weights=None, **KWARGS.get(arch, {}))
        model.load_state_dict(state)
    return model.eval()


def hooked_forward(
    model: nn.Module, modules: list[str], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Outputs of the named modules, cloned the moment each module returns."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for path in modules:

        def hook(_m: nn.Module, _i: Any, out: torch.Tensor, path: str = path) -> None:
            assert path not in captured, f"module {path} ran twice; pick another reference"
            captured[path] = out.detach().clone()

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return captured


def fx_forward(
    arch: str,
    path: Path,
    node: str,
    x: torch.Tensor,
    layout: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """One node via torchvision's own create_feature_extractor, on a separate model instance
    (its weights in `layout`)."""
    model = reference_model(arch, path).to(memory_format=layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = create_feature_extractor(model, return_nodes=[node]).eval()
    with torch.inference_mode():
        return extractor(x)[node].clone()


def folded_copies(server: RunningServer, arch: str) -> int:
    """How many folded convolutions (conv → BatchNorm pairs, or Sequentials holding them) the
    served model's extractors use so far: modules that are not the model's own."""
    loaded = server.server.runtime.model(arch)
    own = {id(m) for m in loaded.weights.module.modules()}
    return sum(id(m) not in own for m in loaded.folded.values())


def extract(
    server: RunningServer, model: str, images: list[pb.Image], nodes: list[str], **kwargs: Any
) -> pb.ExtractResponse:
    request = pb.ExtractRequest(model=model, images=images, nodes=nodes, **kwargs)
    return server.stub().Extract(request, timeout=300)


def assert_close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    """`got` within RTOL of the reference's largest magnitude (conftest.relative_error)."""
    relative_error(got, want, what, RTOL, MIN_SCALE)


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("parity")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {a: save_random_weights(a, folder / f"{a}.pth", **KWARGS.get(a, {})) for a in ARCHS}


@pytest.fixture(scope="module")
def server(weight_files: dict[str, Path]) -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        max_batch_size=8,
        max_wait_ms=5,
        max_message_bytes=256 * 1024 * 1024,
        models=tuple(
            ModelConfig(
                name=a,
                arch=a,
                weights=str(weight_files[a]),
                kwargs=KWARGS.get(a, {}),
                channels_last=CHANNELS_LAST.get(a),
            )
            for a in ARCHS
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def unfolded_server(weight_files: dict[str, Path]) -> Iterator[RunningServer]:
    """A few of the models again, with fold_batchnorm = false (one in the default layout, two
    channels-last, as pinned in CHANNELS_LAST)."""
    settings = Settings(
        port=0,
        max_batch_size=8,
        max_wait_ms=5,
        max_message_bytes=256 * 1024 * 1024,
        torch_threads=UNFOLDED_THREADS,
        models=tuple(
            ModelConfig(
                name=a,
                arch=a,
                weights=str(weight_files[a]),
                channels_last=CHANNELS_LAST[a],
                fold_batchnorm=False,
            )
            for a in UNFOLDED
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def batches() -> dict[int, np.ndarray]:
    return {s: input_batch(s) for s in (224, 299)}


@pytest.fixture(scope="module")
def references(weight_files: dict[str, Path]) -> dict[str, nn.Module]:
    """Reference instances for the models the special cases below reuse."""
    return {a: reference_model(a, weight_files[a]) for a in ("resnet18", "vgg11", "vit_b_16")}


# --- tests -------------------------------------------------------------------------------------
def test_all_models_loaded(server: RunningServer) -> None:
    models = server.stub().ListModels(pb.ListModelsRequest(), timeout=30).models
    assert {m.name: (m.ready, m.status_message) for m in models} == {a: (True, "") for a in ARCHS}
    for m in models:
        assert not m.random_weights and m.weights == f"{m.name}.pth"
        assert list(m.input_size) == [SIZES.get(m.name, 224)] * 2
    layouts = {a: server.server.runtime.model(a).channels_last for a in ARCHS}
    assert layouts == {a: CHANNELS_LAST.get(a, False) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_parity(
    arch: str, server: RunningServer, weight_files: dict[str, Path], batches: dict[int, np.ndarray]
) -> None:
    cases = CASES[arch]
    batch = batches[SIZES.get(arch, 224)]
    response = extract(server, arch, raw_images(batch), [c.requested for c in cases])

    x = torch.from_numpy(batch)
    model = reference_model(arch, weight_files[arch])
    has_batchnorm = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    want = hooked_forward(model, [c.hook for c in cases if c.hook], x)
    del model
    # BatchNorm folding is on by default: this request ran folded convolutions (so the values
    # below check the folding), and a model without BatchNorm has nothing folded
    folded = folded_copies(server, arch)
    assert (folded > 0) == has_batchnorm, f"{arch}: {folded} folded copies"
    for c in cases:
        if c.fx:
            want[c.fx] = fx_forward(arch, weight_files[arch], c.fx, x)

    assert [(n.key, n.requested, n.node) for n in response.metadata.nodes] == [
        (c.requested, c.requested, c.node) for c in cases
    ]
    assert len(response.results) == len(PHOTOS)
    for i, result in enumerate(response.results):
        assert [(o.key, o.node) for o in result.outputs] == [(c.requested, c.node) for c in cases]
        for c, out in zip(cases, result.outputs, strict=True):
            ref = want[c.hook or c.fx or ""][i]
            assert_close(to_array(out.tensor), ref, f"{arch} {c.requested} -> {c.node} image {i}")


def test_inplace_relu_does_not_overwrite_conv_vgg(
    server: RunningServer, references: dict[str, nn.Module], batches: dict[int, np.ndarray]
) -> None:
    batch = batches[224]
    response = extract(server, "vgg11", raw_images(batch), ["features.0", "features.1"])
    want = hooked_forward(
        references["vgg11"], ["features.0", "features.1"], torch.from_numpy(batch)
    )
    for i, result in enumerate(response.results):
        conv, relu = (to_array(o.tensor) for o in result.outputs)
        assert (conv < 0).any(), "features.0 (conv, pre-ReLU) came back without negatives"
        assert_close(conv, want["features.0"][i], f"vgg11 features.0 image {i}")
        assert_close(relu, want["features.1"][i], f"vgg11 features.1 image {i}")
        assert (relu >= 0).all()
        np.testing.assert_array_equal(relu, np.maximum(conv, 0))


def test_inplace_relu_does_not_overwrite_add_resnet(
    server: RunningServer, references: dict[str, nn.Module], batches: dict[int, np.ndarray]
) -> None:
    batch = batches[224]
    nodes = ["layer4.1.bn2", "layer4.1.add", "layer4.1.relu_1"]
    response = extract(server, "resnet18", raw_images(batch), nodes)

    model = references["resnet18"]
    block_input: list[torch.Tensor] = []
    handle = model.layer4[1].register_forward_pre_hook(
        lambda _m, args: block_input.append(args[0].detach().clone())
    )
    try:
        want = hooked_forward(model, ["layer4.1.bn2", "layer4.1"], torch.from_numpy(batch))
    finally:
        handle.remove()
    add = want["layer4.1.bn2"] + block_input[0]  # BasicBlock: out = bn2(...) + identity
    for i, result in enumerate(response.results):
        assert [o.node for o in result.outputs] == nodes
        bn2, added, relu = (to_array(o.tensor) for o in result.outputs)
        assert_close(bn2, want["layer4.1.bn2"][i], f"layer4.1.bn2 image {i}")
        assert_close(added, add[i], f"layer4.1.add image {i}")
        assert_close(relu, want["layer4.1"][i], f"layer4.1.relu_1 image {i}")
        assert (added < 0).any(), "layer4.1.add came back post-ReLU (no negatives)"
        assert (relu >= 0).all()


def test_overlapping_names_resnet(
    server: RunningServer, references: dict[str, nn.Module], batches: dict[int, np.ndarray]
) -> None:
    batch = batches[224]
    nodes = ["layer4", "layer1", "layer4.1.relu_1"]
    response = extract(server, "resnet18", raw_images(batch), nodes)
    want = hooked_forward(references["resnet18"], ["layer4", "layer1"], torch.from_numpy(batch))
    assert [(n.key, n.node) for n in response.metadata.nodes] == [
        ("layer4", "layer4.1.relu_1"),
        ("layer1", "layer1.1.relu_1"),
        ("layer4.1.relu_1", "layer4.1.relu_1"),
    ]
    for i, result in enumerate(response.results):
        assert [o.key for o in result.outputs] == nodes
        assert [o.node for o in result.outputs] == [
            "layer4.1.relu_1",
            "layer1.1.relu_1",
            "layer4.1.relu_1",
        ]
        deep, shallow, deep_full = (to_array(o.tensor) for o in result.outputs)
        np.testing.assert_array_equal(deep, deep_full)
        assert_close(deep, want["layer4"][i], f"layer4 image {i}")
        assert_close(shallow, want["layer1"][i], f"layer1 image {i}")


def test_alias_resnet(
    server: RunningServer, references: dict[str, nn.Module], batches: dict[int, np.ndarray]
) -> None:
    batch = batches[224]
    response = extract(
        server, "resnet18", raw_images(batch), ["layer4", "layer1"], aliases={"layer4": "deep"}
    )
    want = hooked_forward(references["resnet18"], ["layer4", "layer1"], torch.from_numpy(batch))
    assert [(n.key, n.requested, n.node) for n in response.metadata.nodes] == [
        ("deep", "layer4", "layer4.1.relu_1"),
        ("layer1", "layer1", "layer1.1.relu_1"),
    ]
    for i, result in enumerate(response.results):
        assert [o.key for o in result.outputs] == ["deep", "layer1"]
        assert_close(to_array(result.outputs[0].tensor), want["layer4"][i], f"deep image {i}")
        assert_close(to_array(result.outputs[1].tensor), want["layer1"][i], f"layer1 image {i}")


def test_gem_pool_normalized(
    server: RunningServer, references: dict[str, nn.Module], batches: dict[int, np.ndarray]
) -> None:
    batch = batches[224]
    options = pb.OutputOptions(pool=pb.POOLING_GEM, gem_p=3, normalize=True)
    response = extract(server, "resnet18", raw_images(batch), ["layer3"], output=options)
    raw = hooked_forward(references["resnet18"], ["layer3"], torch.from_numpy(batch))["layer3"]
    p = 3.0
    gem = raw.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)
    want = gem / gem.norm(dim=1, keepdim=True)
    for i, result in enumerate(response.results):
        out = result.outputs[0].tensor
        assert out.layout == "NC" and list(out.shape) == [256]
        got = to_array(out)
        assert_close(got, want[i], f"GeM(layer3) image {i}")
        assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


def test_token_pools_vit(
    server: RunningServer, references: dict[str, nn.Module], batches: dict[int, np.ndarray]
) -> None:
    batch = batches[224]
    images = raw_images(batch)
    tokens = hooked_forward(references["vit_b_16"], ["encoder"], torch.from_numpy(batch))["encoder"]
    assert tokens.shape == (2, 197, 768)
    expected = {pb.POOLING_CLS: tokens[:, 0], pb.POOLING_MEAN: tokens[:, 1:].mean(1)}
    for pool, want in expected.items():
        response = extract(
            server, "vit_b_16", images, ["encoder"], output=pb.OutputOptions(pool=pool)
        )
        assert response.metadata.nodes[0].node == "encoder.ln"
        for i, result in enumerate(response.results):
            out = result.outputs[0].tensor
            assert out.layout == "NC" and list(out.shape) == [768]
            what = f"vit encoder pool {pb.Pooling.Name(pool)} image {i}"
            assert_close(to_array(out), want[i], what)


@pytest.mark.parametrize("arch", UNFOLDED)
def test_parity_without_folding_is_bit_for_bit(
    arch: str,
    unfolded_server: RunningServer,
    weight_files: dict[str, Path],
    batches: dict[int, np.ndarray],
) -> None:
    """fold_batchnorm = false serves the model's own arithmetic, bit for bit (README,
    docs/OPERATIONS.md): every value equals an in-process forward of the same weights on the
    same batch in the same memory layout (the server's, pinned in CHANNELS_LAST: convolution
    kernels, and so the last bits, differ between layouts) and with the same torch thread
    count (UNFOLDED_THREADS, the worker's: a run where earlier tests had left the test thread
    at another count differed in the last bits)."""
    cases = CASES[arch]
    batch = batches[224]
    response = extract(unfolded_server, arch, raw_images(batch), [c.requested for c in cases])
    loaded = unfolded_server.server.runtime.model(arch)
    assert loaded.channels_last is CHANNELS_LAST[arch]
    assert folded_copies(unfolded_server, arch) == 0, f"{arch}: folded with fold_batchnorm false"

    layout = torch.channels_last if CHANNELS_LAST[arch] else torch.contiguous_format
    x = torch.from_numpy(batch).contiguous(memory_format=layout)

    def reference() -> dict[str, torch.Tensor]:
        model = reference_model(arch, weight_files[arch]).to(memory_format=layout)
        want = hooked_forward(model, [c.hook for c in cases if c.hook], x)
        for c in cases:
            if c.fx:
                want[c.fx] = fx_forward(arch, weight_files[arch], c.fx, x, layout)
        return want

    want = with_torch_threads(UNFOLDED_THREADS, reference)

    assert [(n.requested, n.node) for n in response.metadata.nodes] == [
        (c.requested, c.node) for c in cases
    ]
    assert len(response.results) == len(PHOTOS)
    for i, result in enumerate(response.results):
        for c, out in zip(cases, result.outputs, strict=True):
            got, ref = to_array(out.tensor), want[c.hook or c.fx or ""][i]
            what = f"{arch} {c.requested} -> {c.node} image {i}, unfolded"
            assert_close(got, ref, what)  # shape, a non-trivial reference
            same = bool(np.array_equal(got, ref.numpy()))
            diff = float(np.abs(got - ref.numpy()).max())
            assert same, f"{what}: not bit for bit (max diff {diff:.3g})"
