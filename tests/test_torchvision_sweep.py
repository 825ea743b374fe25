"""Every torchvision classification model loads and serves the values it computes, over gRPC.

For each architecture in ``torchvision.models.list_models(module=torchvision.models)``: seeded
random weights with BatchNorm running statistics and affine parameters far from the identity (so
BatchNorm folding is exercised: conftest.randomise_trivial_init) and constant-initialised
parameters randomised (``randomise_constants``) are saved to a file the server loads with
``weights = <file>`` and otherwise default model settings. Three of the nodes DescribeModel lists
(early, middle, late; ``pick_nodes`` prefers nodes a later in-place op overwrites, so the clone
the server takes is exercised) are requested raw for one real photo at the model's default input
size, and compared with an in-process reference: the same weights, traced with torchvision's
node names, every in-place op disabled (``reference_values``). torchvision's own
``create_feature_extractor`` is not the reference: with a requested node followed by a later
in-place op (a BatchNorm output before ``ReLU(inplace=True)``), it returns the overwritten value.

Models are served in groups (one server per group, a few large models per server); the first
group runs in the default suite with the server's default settings (warm-up on), the others are
marked slow and start their servers with ``warmup = false`` to save load time (a warm-up forward
and the channels-last timing would cost more than the check itself).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from conftest import RunningServer, photo, randomise_trivial_init, start_server
from PIL import Image
from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer, _set_default_tracer_kwargs

from layertap.client import FeatureClient
from layertap.server.settings import ModelConfig, Settings

ALL_MODELS = sorted(torchvision.models.list_models(module=torchvision.models))

# The default suite: one fast model per family (ResNet, MobileNet, EfficientNet, ViT, Swin,
# ConvNeXt, RegNet, Inception/GoogLeNet) and MaxViT, whose tensor constants once failed every
# extractor build ("'MaxVit' object has no attribute '_tensor_constant0'").
FAST = (
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "vit_b_32",
    "swin_t",
    "convnext_tiny",
    "regnet_x_400mf",
    "googlenet",
    "maxvit_t",
)
# At most this many parameters per slow server: the server's copy, the test's copy while it
# saves the weights and the reference's stay well inside a 24 GiB machine.
GROUP_PARAMS = 300_000_000
# kwargs of the architecture (the server builds it with the same ones, so the state dicts
# match): skip scipy's slow truncated-normal init, the weights are replaced anyway
KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"init_weights": False},
    "inception_v3": {"init_weights": False},
}

# Served and reference values differ by float32 rounding only: BatchNorm folded into the
# convolution before it (the same affine map, applied to the weights instead of the output)
# and fx vs eager kernels. Over the whole sweep the largest difference measured is ~3e-6 of the
# reference's largest magnitude (deep RegNets and EfficientNetV2); a BatchNorm dropped, folded
# with the wrong statistics or applied twice moves values by 10-100 % of it here (running mean
# ~N(0, 0.2^2), variance ~U(0.5, 2), weight ~U(0.5, 1.5)), and an overwritten value (a clone
# missing before an in-place ReLU) loses all its negatives.
RTOL = 2e-5
MIN_SCALE = 1e-2  # a reference smaller than this (or flat) would match anything small
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


# --- weights ---------------------------------------------------------------------------------
def build(arch: str, device: str | None = None) -> nn.Module:
    """The architecture as the server builds it, with real (random) init or on `device`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the default weight initialization ... will change"
        if device is None:
            return torchvision.models.get_model(arch, weights=None, **KWARGS.get(arch, {}))
        with torch.device(device):
            return torchvision.models.get_model(arch, weights=None, **KWARGS.get(arch, {}))


def randomise_constants(model: nn.Module, seed: int = 1) -> nn.Module:
    """Each parameter whose elements all hold one non-zero value (ConvNeXt's layer_scale 1e-6,
    which makes a residual branch's output ~1e-7; LayerNorm weights of 1; Swin V2's
    logit_scale) gets U(0.5, 1.5) per element: a branch scaled to nothing cannot go wrong
    visibly, and an elementwise scale of ones hides a transposed one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            flat = param.detach().flatten()
            if flat.numel() > 1 and param.is_floating_point() and flat[0] != 0:
                if bool((flat == flat[0]).all()):
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    return model


def save_weights(arch: str, path: Path) -> Path:
    torch.manual_seed(0)
    model = randomise_constants(randomise_trivial_init(build(arch)))
    torch.save(model.state_dict(), path)
    return path


def reference_model(arch: str, path: Path) -> nn.Module:
    """The saved weights in a fresh instance (meta init, the file's tensors assigned)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    try:
        model = build(arch, "meta")
        model.load_state_dict(state, assign=True)
    except (NotImplementedError, RuntimeError):  # RegNet computes its widths with .tolist()
        model = build(arch)
        model.load_state_dict(state, assign=True)  # the random init is freed at once
    return model.eval()


# --- the reference -----------------------------------------------------------------------------
def _inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the node writes into its first argument."""
    if node.op == "call_module":
        return getattr(modules[str(node.target)], "inplace", False) is True
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.kwargs.get("inplace") is True or (name.endswith("_") and name[:1] != "_")
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and name[:1] != "_"
    return False


def _out_of_place(node: fx.Node, modules: dict[str, nn.Module]) -> None:
    """Make an in-place node compute a new tensor instead (the same value)."""
    if node.op == "call_module":
        modules[str(node.target)].inplace = False  # type: ignore[assignment]
    elif node.kwargs.get("inplace") is True:
        node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_method":
        node.target = str(node.target)[:-1]
    else:
        twin = getattr(torch, getattr(node.target, "__name__", "")[:-1], None)
        assert twin is not None, f"no out-of-place twin of {node.target} ({node.name})"
        node.target = twin


def traced(model: nn.Module) -> tuple[fx.Graph, dict[fx.Node, str], set[str]]:
    """The eval graph with torchvision's node names (the server's tracer settings), every
    in-place op made out-of-place, and the names of the nodes an in-place op overwrote.

    Disabling an in-place op keeps the model's values only when nothing reads the tensor it
    wrote into after it, except through its result (``x = relu_(x)``): asserted for each one,
    so a model that relies on the write fails here instead of giving a wrong reference."""
    tracer = NodePathTracer(**_set_default_tracer_kwargs({}))
    graph = tracer.trace(model.eval())
    modules = dict(model.named_modules())
    order = {node: i for i, node in enumerate(graph.nodes)}
    overwritten: set[str] = set()
    for node in list(graph.nodes):
        if not _inplace(node, modules):
            continue
        source = node.args[0] if node.args else None
        assert isinstance(source, fx.Node), f"{node.name}: in-place op on {source!r}"
        later = [u.name for u in source.users if u is not node and order[u] > order[node]]
        assert not later, f"{node.name} writes into {source.name}, which {later} read later"
        if source in tracer.node_to_qualname:
            overwritten.add(tracer.node_to_qualname[source])
        _out_of_place(node, modules)
    return graph, dict(tracer.node_to_qualname), overwritten


def reference_values(
    model: nn.Module, graph: fx.Graph, qualnames: dict[fx.Node, str], names: list[str], x: Any
) -> dict[str, np.ndarray]:
    """The values of `names` for input `x`, from the in-place-free graph, truncated after the
    last of them."""
    by_name = {name: node for node, name in qualnames.items()}
    for node in [n for n in graph.nodes if n.op == "output"]:
        graph.erase_node(node)
    graph.output({name: by_name[name] for name in names})
    module = fx.GraphModule(model, graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    with torch.inference_mode():
        out = module(torch.from_numpy(x))
    return {name: out[name].numpy() for name in names}


def pick_nodes(names: list[str], overwritten: set[str]) -> list[str]:
    """Early, middle and late: the nodes at 10 %, 50 % and 90 % of the list, each moved to the
    nearest node within 5 % of the list that an in-place op overwrites, when there is one."""
    window = max(1, len(names) // 20)
    picks: list[str] = []
    for fraction in (0.1, 0.5, 0.9):
        i = round(fraction * (len(names) - 1))
        span = range(max(0, i - window), min(len(names), i + window + 1))
        near = sorted(span, key=lambda j: abs(j - i))
        j = next((j for j in near if names[j] in overwritten and names[j] not in picks), i)
        if names[j] not in picks:
            picks.append(names[j])
    return picks


@functools.cache
def model_input(size: tuple[int, int]) -> np.ndarray:
    """A real photo, resized and ImageNet-normalised: float32 [1, 3, H, W]."""
    img = Image.fromarray(photo("chelsea")).resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray(((arr - MEAN) / STD)[None].astype(np.float32))


# --- groups and servers --------------------------------------------------------------------------
# The slow groups, each at most ~450 M parameters (1.8 GB in float32: the server's copy, plus
# the test's while it saves one model's weights, stay well inside a 24 GiB machine); the four
# largest models (300-650 M) get a server each.
SLOW_GROUPS: tuple[tuple[str, ...], ...] = (
    (
        "alexnet",
        "convnext_small",
        "convnext_base",
        "densenet121",
        "densenet161",
        "densenet169",
        "densenet201",
        "inception_v3",
    ),
    (
        "convnext_large",
        "efficientnet_b1",
        "efficientnet_b2",
        "efficientnet_b3",
        "efficientnet_b4",
        "efficientnet_b5",
        "efficientnet_b6",
    ),
    ("efficientnet_b7", "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"),
    (
        "mnasnet0_5",
        "mnasnet0_75",
        "mnasnet1_0",
        "mnasnet1_3",
        "mobilenet_v2",
        "mobilenet_v3_large",
        "shufflenet_v2_x0_5",
        "shufflenet_v2_x1_0",
        "shufflenet_v2_x1_5",
        "shufflenet_v2_x2_0",
        "squeezenet1_0",
        "squeezenet1_1",
        "regnet_x_800mf",
        "regnet_x_1_6gf",
        "regnet_x_3_2gf",
        "regnet_y_400mf",
        "regnet_y_800mf",
        "regnet_y_1_6gf",
        "regnet_y_3_2gf",
    ),
    ("regnet_x_8gf", "regnet_y_8gf", "regnet_x_16gf", "regnet_y_16gf", "regnet_x_32gf"),
    ("regnet_y_32gf", "resnet34", "resnet50", "resnet101", "resnet152"),
    ("regnet_y_128gf",),
    ("resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2"),
    ("wide_resnet101_2", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"),
    ("vgg11", "vgg11_bn", "vgg13"),
    ("vgg13_bn", "vgg16", "vgg16_bn"),
    ("vgg19", "vgg19_bn", "vit_b_16"),
    ("vit_l_16",),
    ("vit_l_32",),
    ("vit_h_14",),
)
_LISTED = {a for g in (FAST, *SLOW_GROUPS) for a in g}
# a model a later torchvision adds: a server of its own (its size is unknown)
GROUPS: list[tuple[str, ...]] = [
    FAST,
    *SLOW_GROUPS,
    *((a,) for a in ALL_MODELS if a not in _LISTED),
]
CASES = [
    pytest.param(arch, i, id=arch, marks=() if i == 0 else pytest.mark.slow)
    for i, group in enumerate(GROUPS)
    for arch in group
]


class Servers:
    """One running server at a time, for the group the current test needs (tests run in
    group order, so each group's server starts once)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.weights: dict[str, Path] = {}
        self.group: int | None = None
        self.server: RunningServer | None = None

    def get(self, group: int) -> RunningServer:
        if self.group != group:
            self.close()
            archs = GROUPS[group]
            for arch in archs:
                self.weights[arch] = save_weights(arch, self.folder / f"{arch}.pth")
            models = tuple(
                ModelConfig(
                    name=arch,
                    arch=arch,
                    weights=str(self.weights[arch]),
                    kwargs=KWARGS.get(arch, {}),
                )
                for arch in archs
            )
            # The default suite's group loads with the default settings (warm-up on: the
            # deepest node's extractor is built and run at load, and the layout is chosen by
            # timing both), except that batches hold one image, as every request here sends:
            # the layout timing runs at batch 1 instead of 4 (~5x cheaper). The slow groups
            # skip the warm-up: it would cost more than their check.
            if group == 0:
                settings = Settings(port=0, models=models, max_batch_size=1)
            else:
                settings = Settings(port=0, models=models, warmup=False)
            self.server, self.group = start_server(settings), group
        assert self.server is not None
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server, self.group = None, None
        for path in self.weights.values():
            path.unlink(missing_ok=True)
        self.weights.clear()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    running = Servers(tmp_path_factory.mktemp("sweep"))
    yield running
    running.close()


def test_groups_cover_every_model() -> None:
    """Every model once; a name torchvision dropped fails here, not as a load error."""
    listed = [a for g in GROUPS for a in g]
    assert sorted(listed) == ALL_MODELS


@pytest.mark.parametrize(("arch", "group"), CASES)
def test_served_values_equal_the_model(arch: str, group: int, servers: Servers) -> None:
    running = servers.get(group)
    with FeatureClient(running.target, timeout=600) as client:
        info = {m.name: m for m in client.list_models()}[arch]
        assert info.ready, f"{arch} did not load: {info.status_message}"
        description = client.describe(arch)
        assert description.extraction_mode == "fx", description.extraction_reason
        names = description.node_names
        model = reference_model(arch, servers.weights[arch])
        graph, qualnames, overwritten = traced(model)
        nodes = pick_nodes(names, overwritten)
        x = model_input(tuple(info.input_size))  # type: ignore[arg-type]
        got = client.extract(x, model=arch, nodes=nodes)
    want = reference_values(model, graph, qualnames, nodes, x)
    for name in nodes:
        ref, out = want[name], got[name]
        assert out.shape == ref.shape, f"{arch} {name}: shape {out.shape} != {ref.shape}"
        scale = float(np.abs(ref).max())
        assert scale >= MIN_SCALE and float(ref.std()) >= 0.01 * scale, (
            f"{arch} {name}: trivial reference (max |x| {scale:.3g}, std {ref.std():.3g})"
        )
        diff = float(np.abs(out - ref).max())
        assert diff <= RTOL * scale, (
            f"{arch} {name}: max |diff| {diff:.3g} > {RTOL} x reference max |x| {scale:.3g}"
        )
