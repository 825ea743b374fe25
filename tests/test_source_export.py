"""source = "export": programs written by torch.export.save, served over gRPC, equal the eager
models they were exported from, under module-path node names; the archives users get wrong fail
the load clearly.

Three programs are exported here with seeded random weights (conftest's BatchNorm randomising):
torchvision's resnet18 (dynamic batch, H and W: the ImageNet 256/224 default), a two-layer
torchvision VisionTransformer (static 64x64: the size read from the program) and a small CNN
with in-place ops after requested nodes (ReLU(inplace=True), `y.add_(x)`; the entry's own
preprocessing keys). The reference is the eager model in process with its in-place ops turned
off, read by forward hooks on the same module paths; its input is the photo through
torchvision's v2 functional resize, crop and normalise with the preprocessing the server must
describe. Photos travel as raw uint8 pixels, so the server's own preprocessing runs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as F2
from conftest import RunningServer, photo, randomise_trivial_init, relative_error, start_server
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.transforms import InterpolationMode

from layertap.client import FeatureClient
from layertap.server.model_config import ModelConfig
from layertap.server.models import IMAGENET_MEAN, IMAGENET_STD, ModelLoadError, sha256_file
from layertap.server.settings import Settings
from layertap.server.sources import build_model

RTOL = 1e-4  # max |served - eager| <= RTOL x max |eager|
MIN_SCALE = 1e-2  # every reference compared reaches at least this magnitude
PHOTOS = ("astronaut", "chelsea")  # square and 300 x 451
BATCH = {0: torch.export.Dim("batch")}


class Block(nn.Module):
    """conv → BN → residual add → ReLU; in place (`add_`, ReLU(inplace=True)) when exported."""

    def __init__(self, c: int, inplace: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=inplace)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        y = y.add_(x) if self.inplace else y + x
        return self.act(y)


class InplaceNet(nn.Module):
    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=inplace)
        )
        self.block = Block(16, inplace)
        self.gain = torch.linspace(0.5, 2.0, 16).reshape(16, 1, 1)  # a plain tensor: a constant
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x)) * self.gain), 1))


@dataclass(frozen=True)
class Case:
    requested: str  # the name sent (a module path, or an aten node's full name)
    node: str  # the full node name it must resolve to
    hook: str  # the eager module whose output is the reference ...
    pre: bool = False  # ... or whose input


@dataclass(frozen=True)
class Program:
    name: str
    build: Any  # seeded eager model, in-place ops on
    example: tuple[int, int]  # H, W of the export's example input
    dynamic_hw: bool
    cases: tuple[Case, ...]
    entry: dict[str, Any]  # the config entry's own keys
    prep: dict[str, Any]  # the preprocessing the server must apply and describe


def imagenet(resize: int, crop: int) -> dict[str, Any]:
    """The default preprocessing at a crop size (resize: crop x 256 / 224)."""
    return {
        "resize_size": resize,
        "crop_size": (crop, crop),
        "interpolation": "bilinear",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def _vit() -> nn.Module:
    return VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=48, mlp_dim=96
    )


PROGRAMS = {
    p.name: p
    for p in (
        Program(
            "resnet18",
            _resnet18,
            (224, 224),
            True,
            (
                Case("layer1.0.bn1", "layer1.0.bn1", "layer1.0.bn1"),  # ReLU(inplace) after it
                Case("layer2.0.downsample", "layer2.0.downsample.1", "layer2.0.downsample"),
                Case("layer3", "layer3.1.relu_1", "layer3"),
                Case("fc", "fc", "fc"),
            ),
            {},
            imagenet(256, 224),
        ),
        Program(
            "vit",
            _vit,
            (64, 64),
            False,
            (
                Case("conv_proj", "conv_proj", "conv_proj"),
                Case(
                    "encoder.layers.encoder_layer_0.mlp",
                    "encoder.layers.encoder_layer_0.mlp.4",
                    "encoder.layers.encoder_layer_0.mlp",
                ),
                Case(
                    "encoder.layers.encoder_layer_1",
                    "encoder.layers.encoder_layer_1.add_tensor_1",
                    "encoder.layers.encoder_layer_1",
                ),
                Case("encoder.ln", "encoder.ln", "encoder.ln"),
                Case("heads", "heads.head", "heads"),
            ),
            {},
            imagenet(73, 64),
        ),
        Program(
            "inplace",
            InplaceNet,
            (96, 96),
            True,
            (
                Case("stem.1", "stem.1", "stem.1"),  # ReLU(inplace=True) right after it
                Case("block.bn", "block.bn", "block.bn"),  # y.add_(x) right after it
                Case("block.add__tensor", "block.add__tensor", "block.act", pre=True),
                Case("block", "block.act", "block"),
                Case("fc", "fc", "fc"),
            ),
            {
                "input_size": (112, 112),
                "resize_size": 128,
                "interpolation": "bicubic",
                "mean": (0.5, 0.5, 0.5),
                "std": (0.25, 0.25, 0.25),
            },
            {
                "resize_size": 128,
                "crop_size": (112, 112),
                "interpolation": "bicubic",
                "mean": (0.5, 0.5, 0.5),
                "std": (0.25, 0.25, 0.25),
            },
        ),
    )
}


def eager(program: Program, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_trivial_init(program.build().eval(), seed)


def reference(program: Program) -> nn.Module:
    """The same weights with every in-place op off."""
    model = eager(program)
    if isinstance(model, InplaceNet):
        plain = InplaceNet(inplace=False).eval()
        plain.load_state_dict(model.state_dict())
        return plain
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return ref


def export(model: nn.Module, size: tuple[int, int], dims: dict[int, Any], path: Path) -> Path:
    example = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=(dims,)), path)
    return path


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("export")
    paths = {}
    for name, program in PROGRAMS.items():
        dims = dict(BATCH)
        if program.dynamic_hw:  # ResNet's stride 32 needs H, W > 32 for a dynamic size
            dims |= {2: torch.export.Dim("h", min=64), 3: torch.export.Dim("w", min=64)}
        paths[name] = export(eager(program), program.example, dims, folder / f"{name}.pt2")
    return paths


@pytest.fixture(scope="module")
def server(programs: dict[str, Path]) -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        max_batch_size=4,
        max_wait_ms=5,
        models=(
            *(
                ModelConfig(
                    name=name,
                    source="export",
                    path=str(path),
                    channels_last=False,  # pinned: no layout timing at start-up
                    warmup_batch_sizes=(1, 2),
                    **PROGRAMS[name].entry,
                )
                for name, path in programs.items()
            ),
            ModelConfig(
                name="inplace-hooks",
                source="export",
                path=str(programs["inplace"]),
                extraction="hooks",
                **PROGRAMS["inplace"].entry,
            ),
        ),
    )
    started = time.perf_counter()
    running = start_server(settings)
    print(
        f"\nserver with {len(programs)} exported programs (4 entries) ready in "
        f"{time.perf_counter() - started:.1f}s"
    )
    yield running
    running.stop()


def reference_input(program: Program) -> torch.Tensor:
    """The photos through torchvision's v2 functional pipeline (the server's uint8 kernel is
    v2's) with the preprocessing the entry must get."""
    p = program.prep
    out = []
    for name in PHOTOS:
        img = torch.from_numpy(photo(name)).permute(2, 0, 1).contiguous()
        img = F2.resize(
            img, [p["resize_size"]], InterpolationMode(p["interpolation"]), antialias=True
        )
        img = F2.to_dtype(F2.center_crop(img, list(p["crop_size"])), torch.float32, scale=True)
        out.append(F2.normalize(img, mean=list(p["mean"]), std=list(p["std"])))
    return torch.stack(out)


def hooked(model: nn.Module, cases: tuple[Case, ...], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each case's reference: the module's output (or input) cloned when it is produced."""
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str, value: torch.Tensor) -> None:
        seen.setdefault(key, value.clone())

    with contextlib.ExitStack() as hooks, torch.inference_mode():
        for case in cases:
            module, key = model.get_submodule(case.hook), case.requested
            hooks.enter_context(
                module.register_forward_pre_hook(lambda m, args, key=key: keep(key, args[0]))
                if case.pre
                else module.register_forward_hook(lambda m, args, out, key=key: keep(key, out))
            )
        model(x)
    return seen


def rel_err(served: np.ndarray, want: torch.Tensor, what: str) -> float:
    return relative_error(served, want, what, RTOL, MIN_SCALE)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_parity_with_the_eager_model(name: str, server: RunningServer) -> None:
    """Raw outputs of each case over gRPC from uint8 photos equal the eager model's module
    outputs at the same paths; the served preprocessing is the one described."""
    program = PROGRAMS[name]
    photos = [photo(n) for n in PHOTOS]
    with FeatureClient(server.target) as client:
        started = time.perf_counter()
        description = client.describe(name)
        described_s = time.perf_counter() - started
        served = client.extract(photos, model=name, nodes=[c.requested for c in program.cases])
    prep = description.model.preprocessing
    assert (prep.resize_size, tuple(prep.crop_size), prep.interpolation) == (
        program.prep["resize_size"],
        program.prep["crop_size"],
        program.prep["interpolation"],
    )
    np.testing.assert_allclose(prep.mean, program.prep["mean"], rtol=1e-6)
    np.testing.assert_allclose(prep.std, program.prep["std"], rtol=1e-6)
    assert description.extraction_mode == "fx", description.extraction_reason
    for case in program.cases:
        assert served.nodes[case.requested] == case.node
    want = hooked(reference(program), program.cases, reference_input(program))
    errors = {
        c.requested: rel_err(served[c.requested], want[c.requested], f"{name} {c.node}")
        for c in program.cases
    }
    print(
        f"\n{name}: describe {described_s:.2f}s, max rel err "
        + ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
    )


def test_description_names_modules_as_the_eager_model(
    server: RunningServer, programs: dict[str, Path]
) -> None:
    """Module-path node names with the original classes, the file's digest, the ViT's CLS token
    counted, and its cls / mean pools skipping it."""
    with FeatureClient(server.target) as client:
        described = client.describe("resnet18")
        vit = client.describe("vit")
        photos = [photo(n) for n in PHOTOS]
        cls = client.extract(photos, model="vit", nodes="encoder.ln", pool="cls")["encoder.ln"]
        mean = client.extract(photos, model="vit", nodes="encoder.ln", pool="mean")["encoder.ln"]
    info = described.model
    assert info.source == "export" and info.weights == "resnet18.pt2"
    assert info.weights_sha256 == sha256_file(programs["resnet18"])
    note = server.server.runtime.model("resnet18").weights.note
    assert "torch.export.unflatten" in note and "dynamic input size" in note
    targets = {n.name: n.target for n in described.nodes}
    assert targets["layer1.0.conv1"] == "Conv2d" and targets["layer1.0.relu_1"] == "ReLU"
    assert targets["fc"] == "Linear" and "layer1.0.add__tensor" in targets
    types = {m.name: m.type for m in described.modules}
    assert types[""] == "ResNet" and types["layer1.0"] == "BasicBlock"
    # torchvision's own names for the eager model (create_feature_extractor's)
    eager_names = set(
        torchvision.models.feature_extraction.get_graph_node_names(eager(PROGRAMS["resnet18"]))[1]
    )
    modules = {n.name for n in described.nodes if n.op == "call_module"}
    assert modules <= eager_names and len(modules) > 50
    assert vit.model.prefix_tokens == 1
    tokens = hooked(
        reference(PROGRAMS["vit"]),
        (Case("t", "t", "encoder.ln"),),
        reference_input(PROGRAMS["vit"]),
    )["t"]
    rel_err(cls, tokens[:, 0], "vit cls")
    rel_err(mean, tokens[:, 1:].mean(1), "vit mean")


def test_hooks_mode_serves_module_paths_too(server: RunningServer) -> None:
    """extraction = 'hooks' on the same program: module outputs under the same names, taken
    before the in-place ops that follow them."""
    program = PROGRAMS["inplace"]
    cases = tuple(c for c in program.cases if not c.pre)
    with FeatureClient(server.target) as client:
        description = client.describe("inplace-hooks")
        served = client.extract(
            [photo(n) for n in PHOTOS], model="inplace-hooks", nodes=[c.hook for c in cases]
        )
    assert description.extraction_mode == "hooks"
    want = hooked(reference(program), cases, reference_input(program))
    for case in cases:
        rel_err(served[case.hook], want[case.requested], f"hooks {case.hook}")


def test_each_device_gets_a_copy_that_computes_the_same(programs: dict[str, Path]) -> None:
    """Several devices each take a deep copy of the built program (loading.SharedWeights); its
    own forward (hooks mode runs it) calls ResNet's shared ReLU twice per block."""
    built = build_model(ModelConfig(name="m", source="export", path=str(programs["resnet18"])))
    twin = copy.deepcopy(built.module)
    x = torch.randn(3, 3, 72, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), built.module(x), rtol=0, atol=0)
        torch.testing.assert_close(built.module(x), reference(PROGRAMS["resnet18"])(x))


def test_tensor_constants_move_with_the_module(programs: dict[str, Path]) -> None:
    """A tensor the program holds as a constant (InplaceNet.gain) follows .to() like the
    weights: the loader moves models to their device (and channels-last) that way."""
    built = build_model(ModelConfig(name="m", source="export", path=str(programs["inplace"])))
    assert "gain" in dict(built.module.named_buffers())
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.inference_mode():
        got = built.module.to(torch.float64)(x)
        want = reference(PROGRAMS["inplace"]).to(torch.float64)(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)


# --- archives users get wrong --------------------------------------------------------------


def _rewritten(source: Path, target: Path, change: dict[str, Any]) -> Path:
    """A copy of the archive with models/model.json's top-level keys changed."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/models/model.json"):
                data = json.dumps(json.loads(data) | change).encode()
            dst.writestr(item, data)
    return target


def _load_error(path: Path, **keys: Any) -> str:
    with pytest.raises(ModelLoadError) as err:
        build_model(ModelConfig(name="m", source="export", path=str(path), **keys))
    return str(err.value)


def test_a_program_from_another_torch_says_which_and_to_re_export(
    programs: dict[str, Path], tmp_path: Path
) -> None:
    old = _rewritten(programs["inplace"], tmp_path / "old.pt2", {"torch_version": "2.3.0"})
    message = _load_error(old)
    assert "written by torch 2.3.0" in message
    assert f"re-export the model with torch {torch.__version__}" in message


def test_files_that_are_not_programs(programs: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "notes.pt2"
    text.write_text("not a program")
    assert "is not a .pt2 archive (not a zip file)" in _load_error(text)
    checkpoint = tmp_path / "state.pt2"
    torch.save(InplaceNet().state_dict(), checkpoint)
    message = _load_error(checkpoint)
    assert "holds no exported program (a torch.save checkpoint" in message
    assert "`weights`" in message
    assert "does not exist" in _load_error(tmp_path / "missing.pt2")
    # a script object in the constants would be unpickled, native code loaded: refused first
    for entry, refusal in (
        ("data/constants/custom_obj_0", "holds pickled Python objects"),
        ("data/aotinductor/model/model.so", "holds AOTInductor compiled code"),
    ):
        assert refusal in _load_error(_with_entry(programs["inplace"], tmp_path, entry))


def _with_entry(source: Path, folder: Path, entry: str) -> Path:
    """A copy of the archive with one more file, under the archive's root folder."""
    target = folder / f"{entry.replace('/', '_')}.pt2"
    shutil.copy(source, target)
    with zipfile.ZipFile(target) as archive:
        root = archive.namelist()[0].split("/")[0]
    with zipfile.ZipFile(target, "a") as archive:
        archive.writestr(f"{root}/{entry}", b"\x80\x04N.")
    return target


class _Payload:
    """Unpickled, it creates a directory: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_pickled_code_in_the_archive_never_runs(programs: dict[str, Path], tmp_path: Path) -> None:
    """torch.export.load falls back to a full unpickling of sample inputs it cannot read as
    tensors; here every load inside it stays weights_only, so the payload is refused unrun."""
    marker = tmp_path / "ran"
    payload = io.BytesIO()
    torch.save(((_Payload(marker),), {}), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(programs["inplace"]) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, payload.getvalue() if "sample_inputs/" in item.filename else data)
    message = _load_error(evil)
    assert "torch.export.load cannot read" in message and "pickled objects" in message
    assert "weights_only=False" not in message  # no advice to unpickle it
    assert not marker.exists()


def test_a_static_batch_is_refused_with_how_to_export(tmp_path: Path) -> None:
    model = InplaceNet().eval()
    static = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 32, 32),)), static)
    message = _load_error(static)
    assert "exported with a static batch of 2" in message
    assert "dynamic_shapes=({0: torch.export.Dim('batch')},)" in message
    small = export(model, (32, 32), {0: torch.export.Dim("batch", max=2)}, tmp_path / "b2.pt2")
    assert "batch dimension goes up to 2" in _load_error(small, warmup_batch_sizes=(1, 8))


def test_keys_that_do_not_apply_to_a_program(programs: dict[str, Path]) -> None:
    """The weights are in the file; a static program's size is its own."""
    path = programs["vit"]
    assert "carries its own weights" in _load_error(path, weights="other.pth")
    assert "kwargs do not apply" in _load_error(path, kwargs={"num_classes": 3})
    message = _load_error(path, input_size=(96, 96))
    assert "exported for 64x64 inputs only" in message and "remove input_size" in message
    message = _load_error(programs["resnet18"], input_size=(48, 48))  # exported for H, W >= 64
    assert "takes heights 64 or more and widths 64 or more, not the 48x48 input" in message
