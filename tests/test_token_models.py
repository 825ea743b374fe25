"""Token pools, NHWC maps and forward hooks on real architectures, end to end over gRPC.

One server holds torchvision's vit_b_16 (seeded random weights from a file, 64x64: 16 patch
tokens + CLS, fx), swin_t (the same, 64x64: NHWC stages, fx), a DINOv2-like model written here
(CLS + 4 register tokens, data-dependent `interpolate_pos_encoding`: torch.fx cannot trace it,
so `auto` falls back to forward hooks) and small models that probe the hook extractor's edges
(a weight-shared block, a tuple-returning module, in-place ops, BatchNorm, a module that
caches on itself). Every descriptor is checked against an in-process computation on a model
the test builds itself (torchvision's builder and the same weights file, or the same seeded
factory), never on the server's own module. The "regressions" section pins fixes in hooks.py
and catalog.py.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torchvision
from conftest import RunningServer, save_random_weights, start_server
from test_pooling import _regional_reference
from torch import nn
from torchvision.ops import roi_align

from layertap.client import FeatureClient, FeatureServiceError
from layertap.server.catalog import default_prefix_tokens
from layertap.server.hooks import build_hook_catalog, build_hook_extractor
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

HERE = Path(__file__).resolve()
N_REGISTERS = 4
PATCH = 8
DINO_SIZE = 32  # 4x4 patches


# --------------------------------------------------------------------------- a DINOv2-like model
class PatchEmbed(nn.Module):
    """Conv patchify → [B, N, C] (the reference's PatchEmbed, flatten_embedding=True)."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        assert h % self.patch == 0 and w % self.patch == 0, "input must be a multiple of the patch"
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoLike(nn.Module):
    """The traits of facebookresearch/dinov2's DinoVisionTransformer that matter here: CLS +
    register tokens ([cls, reg_1..reg_R, patches]), `interpolate_pos_encoding` with
    data-dependent control flow, blocks in a ModuleList, a final norm, a head on the CLS."""

    def __init__(self, dim: int = 32, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.patch_size = PATCH
        n_patches = (DINO_SIZE // PATCH) ** 2
        self.patch_embed = PatchEmbed(PATCH, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.1)
        self.register_tokens = nn.Parameter(torch.randn(1, N_REGISTERS, dim))
        self.num_register_tokens = N_REGISTERS
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Identity()

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:  # fx: a Proxy used as a bool
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        m = int(math.sqrt(n))
        dim = x.shape[-1]
        grid = patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(
            grid, size=(w // self.patch_size, h // self.patch_size), mode="bicubic"
        )
        return torch.cat((cls_pos, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        _, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        registers = self.register_tokens.expand(x.shape[0], -1, -1)
        return torch.cat((x[:, :1], registers, x[:, 1:]), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def dino_like(seed: int = 0) -> nn.Module:
    """The same weights on every call (seeded without touching the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DinoLike()


# --------------------------------------------------------------------------- hook edge cases
class Pair(nn.Module):
    """Returns a tuple: not a node itself; its children are."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.left = nn.Conv2d(width, width, 1)
        self.right = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.left(x), self.right(x)


class Edges(nn.Module):
    """What forward hooks must survive: BatchNorm with real running statistics, a weight-shared
    block called twice, in-place ops right after hooked modules (a ReLU(inplace=True) module,
    tensor methods on an Identity's output), a tuple-returning module; `if <tensor>` makes it
    untraceable, so `auto` serves it through hooks."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)
        self.block = nn.Conv2d(width, width, 3, padding=1)  # called twice
        self.act = nn.ReLU(inplace=True)
        self.pair = Pair(width)
        self.ident = nn.Identity()
        self.head = nn.Linear(width, 3)
        self.spare = nn.Conv2d(width, width, 1)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x))
        if torch.isfinite(x).all():  # data-dependent: torch.fx cannot trace this
            x = x * 1.0
        y = self.act(self.block(x))  # ReLU in place on block's first output
        z = self.block(y)  # the second call of the shared block
        a, b = self.pair(z)
        c = self.ident(a)  # Identity returns `a` itself ...
        c.mul_(-1.0)  # ... which this overwrites, in place
        c += b
        return self.head(c.relu_().mean((2, 3)))


def edges(seed: int = 1) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Edges()


def edges_reference(model: Edges, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every module output by hand, each a fresh tensor (no hooks involved)."""
    with torch.inference_mode():
        model.eval()
        stem = model.stem(x)
        bn = model.bn(stem)
        first = model.block(bn)
        act = torch.relu(first)
        second = model.block(act)
        left, right = model.pair.left(second), model.pair.right(second)
        c = torch.relu(-left + right)
        head = model.head(c.mean((2, 3)))
    return {
        "stem": stem,
        "bn": bn,
        "block": first,  # a module called twice gives its first call's output
        "act": act,
        "pair.left": left,  # = ident: returned before the in-place mul_
        "pair.right": right,
        "ident": left,
        "head": head,
    }


class LazyGrid(nn.Module):
    """Caches a positional grid on itself at its first forward (as position-embedding and anchor
    code does), and has data-dependent control flow after it: the failed fx trace of `auto`
    runs the caching line with a Proxy, which must not stay on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.grid: torch.Tensor | None = None
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.grid is None:
            self.grid = torch.linspace(0, 1, y.shape[-1], device=y.device)
        y = y + self.grid
        if y.mean() > 1e6:  # data-dependent: torch.fx cannot trace this
            y = -y
        return self.out(y)


def lazy_grid() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        return LazyGrid()


# --------------------------------------------------------------------------- server
RANDOM = {"weights": "none", "allow_random": True}
# served name -> (torchvision architecture, builder kwargs)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("vit_b_16", {"image_size": 64}),
    "swin": ("swin_t", {}),
}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeded random weights (a non-zero ViT head, conftest.save_random_weights) in files the
    server loads and the test's own reference models load too."""
    folder = tmp_path_factory.mktemp("tokens")
    return {
        name: save_random_weights(arch, folder / f"{name}.pth", **kwargs)
        for name, (arch, kwargs) in ARCHS.items()
    }


@pytest.fixture(scope="module")
def server(weight_files: dict[str, Path]) -> Iterator[RunningServer]:
    vit, swin = str(weight_files["vit"]), str(weight_files["swin"])
    settings = Settings(
        port=0,
        max_batch_size=8,
        max_wait_ms=50,
        models=(
            ModelConfig(name="vit", arch="vit_b_16", kwargs={"image_size": 64}, weights=vit),
            # the same base module (shared weights) through forward hooks
            ModelConfig(
                name="vit-hooks",
                arch="vit_b_16",
                kwargs={"image_size": 64},
                weights=vit,
                extraction="hooks",
            ),
            ModelConfig(name="swin", arch="swin_t", input_size=(64, 64), weights=swin),
            # likewise
            ModelConfig(
                name="swin-hooks",
                arch="swin_t",
                input_size=(64, 64),
                weights=swin,
                extraction="hooks",
            ),
            # the factory as a .py file path (examples/face/face.toml's form)
            ModelConfig(
                name="dino",
                factory=f"{HERE}:dino_like",
                input_size=(DINO_SIZE, DINO_SIZE),
                **RANDOM,  # prefix_tokens auto: cls_token + num_register_tokens
            ),
            ModelConfig(name="edges", factory=f"{HERE}:edges", input_size=(16, 16), **RANDOM),
            ModelConfig(name="lazy", factory=f"{HERE}:lazy_grid", input_size=(16, 16), **RANDOM),
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


Reference = Callable[[str], nn.Module]


@pytest.fixture(scope="module")
def reference(weight_files: dict[str, Path]) -> Reference:
    """reference(name): a fresh torchvision model with the weights file the server loaded."""
    built: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in built:
            arch, kwargs = ARCHS[name]
            state = torch.load(weight_files[name], map_location="cpu", weights_only=True)
            with torch.device("meta"):
                model = torchvision.models.get_model(arch, weights=None, **kwargs)
            model.load_state_dict(state, assign=True)
            assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
            built[name] = model.eval()
        return built[name]

    return get


def module_outputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The first output of each named module in a plain forward (the in-process reference)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            seen.setdefault(name, out.clone())

        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def describe(server: RunningServer, model: str) -> pb.DescribeModelResponse:
    return server.stub().DescribeModel(pb.DescribeModelRequest(model=model), timeout=30)


def refused(call: Any) -> FeatureServiceError:
    with pytest.raises(FeatureServiceError) as error:
        call()
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT, error.value
    return error.value


def close(actual: Any, expected: torch.Tensor, tol: float = 1e-4) -> None:
    np.testing.assert_allclose(np.asarray(actual), expected.numpy(), atol=tol, rtol=tol)


def images(seed: int, n: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


# --------------------------------------------------------------------------- ViT (fx, NLC)
VIT_LAST = "encoder.layers.encoder_layer_11"


def test_vit_token_pools_equal_in_process(server: RunningServer, reference: Reference) -> None:
    response = describe(server, "vit")
    assert response.extraction_mode == "fx" and response.model.prefix_tokens == 1
    by_name = {n.name: n for n in response.nodes}
    assert by_name["encoder.ln"].layout == "NLC"
    assert tuple(by_name["encoder.ln"].shape) == (1, 17, 768)  # 4x4 patches + CLS

    x = images(0, 2, 64)
    nodes = [VIT_LAST, "encoder.ln"]
    ref = module_outputs(reference("vit"), torch.from_numpy(x), nodes)
    with FeatureClient(server.target) as client:
        raw = client.extract(list(x), model="vit", nodes=nodes)
        assert raw.nodes[VIT_LAST] == f"{VIT_LAST}.add_1" and raw.layouts[VIT_LAST] == "NLC"
        out = {
            pool: client.extract(list(x), model="vit", nodes=nodes, pool=pool)
            for pool in ("cls", "mean", "cls_mean", "avg", "gem", "max")
        }
    for name in nodes:
        t = ref[name]
        assert t.shape == (2, 17, 768)
        close(raw[name], t)
        cls, mean = t[:, 0], t[:, 1:].mean(1)
        close(out["cls"][name], cls)
        close(out["mean"][name], mean)
        close(out["cls_mean"][name], torch.cat([cls, mean], 1))
        # the spatial pools take every token of an NLC output, the CLS token included
        close(out["avg"][name], t.mean(1))
        close(out["max"][name], t.amax(1))
        close(out["gem"][name], t.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3))


def test_vit_through_hooks_equals_fx(server: RunningServer) -> None:
    """The same weights served through forward hooks: an encoder block is a module there (its
    fx counterpart is the block's last node), its attention returns a tuple (not a node)."""
    response = describe(server, "vit-hooks")
    assert response.extraction_mode == "hooks" and response.model.prefix_tokens == 1
    assert "encoder.layers.encoder_layer_0.self_attention" in response.extraction_reason
    x = images(9, 2, 64)
    with FeatureClient(server.target) as client:
        for pool in ("cls", "mean", "cls_mean", "gem"):
            fx = client.extract(list(x), model="vit", nodes=[VIT_LAST, "encoder.ln"], pool=pool)
            hooks = client.extract(
                list(x), model="vit-hooks", nodes=[VIT_LAST, "encoder.ln"], pool=pool
            )
            assert hooks.nodes[VIT_LAST] == VIT_LAST
            for key in (VIT_LAST, "encoder.ln"):
                close(hooks[key], torch.from_numpy(fx[key]))


def test_vit_refuses_map_pools_and_regions_with_reasons(server: RunningServer) -> None:
    x = images(1, 1, 64)
    with FeatureClient(server.target) as client:
        err = refused(lambda: client.extract(x, model="vit", nodes="encoder.ln", pool="rmac"))
        assert "NCHW or NHWC" in err.details and "cls, mean or cls_mean" in err.details
        err = refused(
            lambda: client.extract(
                x, model="vit", nodes="encoder.ln", pool="avg", regions=[[(0, 0, 32, 32)]]
            )
        )
        assert "regions need feature-map nodes" in err.details and "NLC" in err.details


# --------------------------------------------------------------------------- Swin (fx, NHWC)
SWIN_STAGES = {"features.1": (16, 16, 96), "features.3": (8, 8, 192), "features.7": (2, 2, 768)}


def test_swin_nhwc_stage_pools_equal_in_process(
    server: RunningServer, reference: Reference
) -> None:
    described = describe(server, "swin").nodes
    for name, hwc in SWIN_STAGES.items():  # a stage: the last node under its prefix
        last = [n for n in described if n.name.startswith(name + ".")][-1]
        assert last.layout == "NHWC" and tuple(last.shape) == (1, *hwc), last
    assert {n.name: n for n in described}["permute"].layout == "NCHW"  # back to channels-first

    x = images(2, 2, 64)
    nodes = list(SWIN_STAGES)
    ref = module_outputs(reference("swin"), torch.from_numpy(x), nodes)
    with FeatureClient(server.target) as client:
        raw = client.extract(list(x), model="swin", nodes=nodes)
        out = {
            pool: client.extract(list(x), model="swin", nodes=nodes, pool=pool)
            for pool in ("avg", "gem", "rmac", "rgem")
        }
        assert raw.layouts["features.1"] == "NHWC" and out["avg"].layouts["features.1"] == "NC"
    for name in nodes:
        close(raw[name], ref[name])
        m = ref[name].permute(0, 3, 1, 2)  # NHWC -> NCHW
        close(out["avg"][name], m.mean((2, 3)))
        close(out["gem"][name], m.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3))
        close(out["rmac"][name], _regional_reference(m, 3, "max"))
        close(out["rgem"][name], _regional_reference(m, 3, "gem"))


def test_swin_through_hooks_has_the_same_nhwc_stages(server: RunningServer) -> None:
    """Hooks mode guesses layouts from the modules (LayerNorm over the last dim: NHWC); a stage
    is a module there, so its output equals the fx catalogue's last node of the stage."""
    by_name = {n.name: n for n in describe(server, "swin-hooks").nodes}
    for name, hwc in SWIN_STAGES.items():
        assert by_name[name].layout == "NHWC" and tuple(by_name[name].shape) == (1, *hwc)
    x = images(8, 2, 64)
    nodes = [*SWIN_STAGES, "norm"]
    with FeatureClient(server.target) as client:
        fx = client.extract(list(x), model="swin", nodes=nodes, pool="rmac")
        hooks = client.extract(list(x), model="swin-hooks", nodes=nodes, pool="rmac")
    assert hooks.layouts == fx.layouts
    for name in nodes:
        close(hooks[name], torch.from_numpy(fx[name]))


def test_swin_regions_on_an_nhwc_stage(server: RunningServer, reference: Reference) -> None:
    """Boxes in input pixels (a raw 64x64 tensor: no resize) on the 16x16 NHWC stage."""
    x = images(3, 2, 64)
    boxes = [[(0, 0, 64, 64), (8, 4, 40, 60)], [(16, 16, 48, 32)]]
    ref = module_outputs(reference("swin"), torch.from_numpy(x), ["features.1"])
    fmap = ref["features.1"].permute(0, 3, 1, 2).contiguous()
    with FeatureClient(server.target) as client:
        pooled = client.extract(
            list(x), model="swin", nodes="features.1", pool="avg", regions=boxes, roi_size=8
        )
        bins = client.extract(list(x), model="swin", nodes="features.1", regions=boxes, roi_size=8)
    for i, image_boxes in enumerate(boxes):
        scaled = torch.tensor(image_boxes, dtype=torch.float32) * (16 / 64)
        expected = roi_align(
            fmap[i : i + 1],
            [scaled],
            output_size=8,
            spatial_scale=1,
            sampling_ratio=2,
            aligned=True,
        )
        close(bins["features.1"][i], expected)
        close(pooled["features.1"][i], expected.mean((2, 3)))
    # a whole-input box on a map of side 2 * roi_size samples exactly the pixel centres
    close(pooled["features.1"][0][0], fmap[0].mean((1, 2)))


# --------------------------------------------------------------------------- DINOv2-like (hooks)
def test_dino_like_falls_back_to_hooks_with_register_tokens(server: RunningServer) -> None:
    response = describe(server, "dino")
    assert response.extraction_mode == "hooks"
    assert response.extraction_reason.startswith("torch.fx cannot trace it (TraceError")
    assert response.model.prefix_tokens == 1 + N_REGISTERS
    by_name = {n.name: n for n in response.nodes}
    tokens = 1 + N_REGISTERS + (DINO_SIZE // PATCH) ** 2
    for name in ("blocks.0", "blocks.3", "norm"):
        assert by_name[name].layout == "NLC" and tuple(by_name[name].shape) == (1, tokens, 32)
    assert "blocks" not in by_name  # a ModuleList never runs: "blocks" means its last node

    x = images(4, 3, DINO_SIZE)
    nodes = ["blocks.1", "blocks.3", "norm"]
    model = dino_like()
    ref = module_outputs(model, torch.from_numpy(x), nodes)
    with torch.inference_mode():  # the model's own answer: the head on the normed CLS token
        head = model(torch.from_numpy(x))
    with FeatureClient(server.target) as client:
        raw = client.extract(list(x), model="dino", nodes=nodes)
        out = {
            pool: client.extract(list(x), model="dino", nodes=nodes, pool=pool)
            for pool in ("cls", "mean", "cls_mean")
        }
        last = client.extract(list(x), model="dino", nodes="blocks", pool="mean")
        assert last.nodes["blocks"] == "blocks.3"
    close(out["cls"]["norm"], head)
    for name in nodes:
        t = ref[name]
        close(raw[name], t)
        cls, patches = t[:, 0], t[:, 1 + N_REGISTERS :].mean(1)  # registers skipped
        close(out["cls"][name], cls)
        close(out["mean"][name], patches)
        close(out["cls_mean"][name], torch.cat([cls, patches], 1))
        assert not np.allclose(out["mean"][name], t[:, 1:].mean(1).numpy(), atol=1e-3)
    close(last["blocks"], ref["blocks.3"][:, 1 + N_REGISTERS :].mean(1))


def test_dino_like_concurrent_requests_for_different_blocks(server: RunningServer) -> None:
    """Batched together (max_wait_ms=50): one hooked forward over the union of the node sets,
    each request gets its own images' outputs for its own block."""
    node_sets = [["blocks.0"], ["blocks.2"], ["blocks.1", "norm"], ["blocks.3"]] * 2
    pools = ["mean", "cls", None, "cls_mean"] * 2
    inputs = [images(10 + i, 1, DINO_SIZE) for i in range(len(node_sets))]
    results: list[Any] = [None] * len(node_sets)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(node_sets))

    def call(i: int) -> None:
        try:
            with FeatureClient(server.target) as client:
                client.list_models()  # connected before the barrier: the calls arrive together
                barrier.wait(30)
                results[i] = client.extract(
                    inputs[i], model="dino", nodes=node_sets[i], pool=pools[i]
                )
        except BaseException as exc:  # reported on the test thread
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(node_sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert max(r.metadata.batch_size for r in results) > 1  # some really shared a forward
    model = dino_like()
    for i, nodes in enumerate(node_sets):
        ref = module_outputs(model, torch.from_numpy(inputs[i]), nodes)
        assert list(results[i]) == nodes
        for name in nodes:
            t = ref[name]
            expected = {
                None: t,
                "cls": t[:, 0],
                "mean": t[:, 1 + N_REGISTERS :].mean(1),
                "cls_mean": torch.cat([t[:, 0], t[:, 1 + N_REGISTERS :].mean(1)], 1),
            }[pools[i]]
            close(results[i][name], expected)


# --------------------------------------------------------------------------- hook edge cases
def test_hooks_shared_block_inplace_ops_and_tuples(server: RunningServer) -> None:
    response = describe(server, "edges")
    assert response.extraction_mode == "hooks"
    names = [n.name for n in response.nodes]
    assert names == ["stem", "bn", "block", "act", "pair.left", "pair.right", "ident", "head"]
    assert "pair" in response.extraction_reason  # the tuple-returning module is named

    x = images(5, 2, 16)
    ref = edges_reference(edges(), torch.from_numpy(x))
    with FeatureClient(server.target) as client:
        every = client.extract(list(x), model="edges", nodes=names)
        alone = {n: client.extract(list(x), model="edges", nodes=n)[n] for n in names}
        err = refused(lambda: client.extract(list(x), model="edges", nodes="pair"))
        never = refused(lambda: client.extract(list(x), model="edges", nodes="spare"))
    assert "tuple" in err.details and "submodules" in err.details
    assert "did not return a tensor in the forward at load" in never.details
    for name in names:
        close(every[name], ref[name], 1e-5)
        close(alone[name], ref[name], 1e-5)
    # cloned when they fired: block before the in-place ReLU, ident/pair.left before mul_
    assert every["block"].min() < 0 and every["ident"].min() < 0
    np.testing.assert_array_equal(every["ident"], every["pair.left"])


def test_early_stop_keeps_batchnorm_and_eval_state(server: RunningServer) -> None:
    module = server.server.runtime.model("edges").weights.module
    stats = {k: v.clone() for k, v in module.bn.state_dict().items()}
    x = images(6, 2, 16)
    ref = edges_reference(edges(), torch.from_numpy(x))
    with FeatureClient(server.target) as client:
        for _ in range(2):  # stopped right after bn, then a full forward, twice
            close(client.extract(list(x), model="edges", nodes="bn")["bn"], ref["bn"], 1e-5)
            close(client.extract(list(x), model="edges", nodes="head")["head"], ref["head"], 1e-5)
    assert not module.training and not module.bn.training
    for key, value in module.bn.state_dict().items():
        assert torch.equal(value, stats[key]), key
    assert not module.bn._forward_hooks and not module.head._forward_hooks  # all removed


# --------------------------------------------------------------------------- regressions
class Rethrows(nn.Module):
    """Model code that re-raises whatever its kernel raises, with context (as fused-attention
    fallbacks and wrappers do): the early stop must not be caught by it."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Conv2d(3, 4, 1)
        self.after = nn.Conv2d(4, 4, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            y = self.kernel(x)
        except Exception as exc:
            raise RuntimeError("the kernel failed") from exc
        self.calls += 1
        return self.after(y)


def test_early_stop_passes_through_model_exception_handlers() -> None:
    model = Rethrows().eval()
    catalog = build_hook_catalog(model, (8, 8), torch.device("cpu"), "configured")
    x = torch.randn(2, 3, 8, 8)
    calls = model.calls
    with torch.inference_mode():
        out = build_hook_extractor(catalog, ["kernel"])(x)["kernel"]
        close(out, model.kernel(x))
    assert model.calls == calls  # stopped inside the try, not after it


class Conv1dTokens(nn.Module):
    """[N, C, L] from a Conv1d (channels first), then proper [N, L, C] tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 1)
        self.act = nn.ReLU()
        self.embed = nn.Linear(5, 7)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x.flatten(2)))  # [N, 5, 64]
        return self.drop(self.embed(y.transpose(1, 2)))  # [N, 64, 7]


def test_hooks_do_not_call_channels_first_3d_outputs_tokens() -> None:
    catalog = build_hook_catalog(Conv1dTokens().eval(), (8, 8), torch.device("cpu"), "configured")
    layouts = {n.name: (n.layout, n.shape) for n in catalog.nodes}
    assert layouts == {
        "conv": ("", (1, 5, 64)),  # [N, C, L]: no token pool may treat it as NLC
        "act": ("", (1, 5, 64)),  # elementwise: inherits
        "embed": ("NLC", (1, 64, 7)),
        "drop": ("NLC", (1, 64, 7)),
    }


def test_vit_flattened_patch_map_is_not_tokens(server: RunningServer) -> None:
    """vit_b_16 fixes its input size, so no probe tells its dims apart: `reshape` ([N, 768, 16],
    the patch map with flattened spatial dims) must not be taken for 768 tokens of 16 values."""
    by_name = {n.name: n for n in describe(server, "vit").nodes}
    assert tuple(by_name["reshape"].shape) == (1, 768, 16) and by_name["reshape"].layout == ""
    assert by_name["permute"].layout == "NLC"
    with FeatureClient(server.target) as client:
        err = refused(
            lambda: client.extract(images(7, 1, 64), model="vit", nodes="reshape", pool="mean")
        )
    assert "needs a token output (layout NLC)" in err.details


def test_prefix_tokens_per_node(server: RunningServer) -> None:
    """Patch tokens from before the CLS/register tokens are prepended carry none of them."""
    dino = server.server.runtime.model("dino").catalog
    assert dino.prefix_tokens("patch_embed", 1 + N_REGISTERS) == 0  # 16 tokens, blocks have 21
    assert dino.prefix_tokens("blocks.0", 1 + N_REGISTERS) == 1 + N_REGISTERS
    assert dino.prefix_tokens("norm", 1 + N_REGISTERS) == 1 + N_REGISTERS
    assert dino.prefix_tokens("head", 1 + N_REGISTERS) == 0  # NC
    vit = server.server.runtime.model("vit").catalog
    assert vit.prefix_tokens("permute", 1) == 0 and vit.prefix_tokens("encoder.ln", 1) == 1
    assert vit.prefix_tokens("encoder.ln", 0) == 0


def test_patch_embedding_pools_skip_no_tokens_over_grpc(server: RunningServer) -> None:
    """`mean` on the patch embedding averages all its tokens (none is a CLS/register token);
    `cls` there is refused, not answered with the first patch."""
    x = images(7, 2, DINO_SIZE)
    ref = module_outputs(dino_like(), torch.from_numpy(x), ["patch_embed"])["patch_embed"]
    with FeatureClient(server.target) as client:
        mean = client.extract(list(x), model="dino", nodes="patch_embed", pool="mean")
        close(mean["patch_embed"], ref.mean(1))
        for pool in ("cls", "cls_mean"):
            error = refused(
                lambda pool=pool: client.extract(
                    list(x), model="dino", nodes="patch_embed", pool=pool
                )
            )
            assert "before the CLS token is prepended" in str(error), error


def test_default_prefix_tokens_from_module_attributes() -> None:
    class Timm(nn.Module):
        num_prefix_tokens = 2  # e.g. CLS + distillation token

    no_cls = DinoLike()
    no_cls.cls_token = None  # type: ignore[assignment]
    vit = torchvision.models.VisionTransformer(32, 16, 1, 1, 8, 8)
    assert default_prefix_tokens(vit) == 1  # class_token
    assert default_prefix_tokens(DinoLike()) == 1 + N_REGISTERS  # cls_token + registers
    assert default_prefix_tokens(no_cls) == N_REGISTERS
    assert default_prefix_tokens(Timm()) == 2
    assert default_prefix_tokens(Edges()) == 0


def test_a_failed_trace_leaves_no_proxy_on_the_module(server: RunningServer) -> None:
    """`auto` traces first: the module's cache must be as before the trace, or the hooks
    fallback's forward (and every later one) computes with a Proxy and the model never loads."""
    response = describe(server, "lazy")
    assert response.extraction_mode == "hooks", response.model.status_message
    x = images(11, 2, 16)
    model = lazy_grid().eval()
    with torch.inference_mode():
        conv = model.conv(torch.from_numpy(x))
        expected = model.out(conv + torch.linspace(0, 1, 16))
    with FeatureClient(server.target) as client:
        out = client.extract(list(x), model="lazy", nodes=["conv", "out"])
    close(out["conv"], conv)
    close(out["out"], expected)
