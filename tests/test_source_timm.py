"""source = "timm": eight timm architectures served over gRPC equal timm's own forward and
timm's own preprocessing, node names are timm's, and the configs users get wrong fail clearly.

One server holds every model, each with seeded random weights saved as safetensors (conftest's
BatchNorm randomising, plus layer-scale gammas lifted from timm's 1e-5/1e-6 init so the blocks
they scale count). The reference is built by the test: timm.create_model with the same file,
nodes taken by timm's own create_feature_extractor (timm's leaf modules and autowrapped
functions, so a served name timm does not know fails here), its input the photos through the
preprocessing the server describes, which itself is checked against timm's create_transform on
the PIL photo (within one uint8 level: the server resizes with torchvision's uint8 kernel, a
port of Pillow's, and timm with Pillow itself). Photos travel as raw uint8 pixels, so the
server's own decode and preprocessing run.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import timm.data
import torch
from conftest import RunningServer, photo, randomise_trivial_init, relative_error, start_server
from PIL import Image
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg
from timm.models._features_fx import create_feature_extractor

from layertap.client import FeatureClient
from layertap.server.model_config import ModelConfig
from layertap.server.models import ModelLoadError, sha256_file
from layertap.server.preprocess import Preprocessing, preprocess
from layertap.server.settings import Settings
from layertap.server.sources import build_model
from layertap.v1 import layertap_pb2 as pb

RTOL = 1e-4  # max |served - timm| <= RTOL x max |timm|
PHOTOS = ("astronaut", "chelsea")  # square and 300 x 451 (the shorter-side arithmetic)
CACHED = "mobilenetv3_small_050"  # also served as DEFAULT, from a local Hub cache made here


@dataclass(frozen=True)
class Spec:
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False
    nodes: tuple[str, ...] = ()  # besides the early/middle/last nodes picked from DescribeModel
    tokens: str = ""  # an NLC node whose cls/mean pools are checked
    prefix: int = 0  # timm's num_prefix_tokens


SPECS = {
    s.arch: s
    for s in (
        # CLS + 4 registers; img_size 56: 4 x 4 patches of 14
        Spec(
            "vit_small_patch14_reg4_dinov2",
            {"img_size": 56},
            nodes=("blocks.5",),
            tokens="norm",
            prefix=5,
        ),
        # NHWC LayerNorms between NCHW convolutions; channels-last weights
        Spec("convnext_atto", channels_last=True, nodes=("stages.2", "stem.1.layer_norm")),
        Spec("efficientnet_b0", nodes=("blocks.3", "conv_head")),
        Spec("resnet18d", channels_last=True, nodes=("layer3",)),  # deep stem, avg-pool shortcut
        Spec("coatnet_nano_rw_224", nodes=("stages.1", "stages.3")),  # MBConv + transformer
        # NHWC stages; img_size 128 with 4 x 4 windows keeps it small
        Spec(
            "swin_tiny_patch4_window7_224",
            {"img_size": 128, "window_size": 4},
            nodes=("layers.1", "norm"),
        ),
        Spec("eva02_tiny_patch14_224", nodes=("blocks.6",), tokens="norm", prefix=1),  # RoPE
        Spec(CACHED, nodes=("blocks.2",)),
    )
}
ARCHS = list(SPECS)


# --- weights and references ----------------------------------------------------------------
def timm_model(spec: Spec) -> torch.nn.Module:
    return timm.create_model(spec.arch, pretrained=False, **spec.kwargs).eval()


def save_weights(spec: Spec, path: Path) -> Path:
    """Seeded weights with nothing trivial: conftest's BatchNorm statistics and zero weights,
    and layer-scale gammas (timm starts them at 1e-5 or 1e-6, which makes every block they
    scale invisible at this tolerance) drawn from U(0.5, 1.5)."""
    torch.manual_seed(0)
    model = randomise_trivial_init(timm_model(spec))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1 and 0 < float(param.abs().max()) < 1e-3:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def reference(spec: Spec, path: Path) -> torch.nn.Module:
    """timm's model with the saved weights; its in-place activations made out-of-place, so a
    node's value is not overwritten after timm's extractor returns it (the served nodes are
    cloned where they are produced)."""
    from safetensors.torch import load_file

    model = timm_model(spec)
    model.load_state_dict(load_file(str(path)))
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False  # type: ignore[assignment]
    return model.eval()


def timm_input(
    model: torch.nn.Module, name: str, args: dict[str, Any] | None = None
) -> torch.Tensor:
    """timm's own eval transform of the PIL photo, for the model as the entry builds it."""
    config = timm.data.resolve_data_config(args or {}, model=model)
    transform = timm.data.create_transform(**config)
    return transform(Image.fromarray(photo(name)))


def levels_apart(ours: torch.Tensor, theirs: torch.Tensor, std: tuple[float, ...]) -> torch.Tensor:
    """Per-value distance of two normalised inputs in uint8 levels, checked: within one level,
    but for at most one value at two (torchvision's uint8 kernel ports Pillow's resampling and
    rounds a little differently: one value of 442,368 in a 512 -> 384 bicubic squash of
    astronaut and of coffee, measured)."""
    levels = ((ours - theirs).abs() * 255 * torch.tensor(std).view(3, 1, 1)).round()
    assert float(levels.max()) <= 2 and int((levels > 1).sum()) <= 1, (
        f"{int((levels > 1).sum())} values more than one level apart, up to {levels.max()}"
    )
    return levels


def served_inputs(server: RunningServer, arch: str, photos: list[np.ndarray]) -> torch.Tensor:
    """The photos as the server makes them into inputs: its described preprocessing."""
    prep = server.server.runtime.model(arch).weights.preprocessing
    return torch.stack([preprocess(torch.from_numpy(p).permute(2, 0, 1), prep) for p in photos])


def close(got: np.ndarray, want: torch.Tensor, what: str) -> float:
    """Max |got - want| relative to max |want|, asserted <= RTOL; the reference must vary."""
    return relative_error(got, want, what, RTOL)


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("timm")
    return {a: save_weights(s, folder / f"{a}.safetensors") for a, s in SPECS.items()}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, weights: dict[str, Path]) -> Iterator[Path]:
    """A local Hugging Face hub cache holding timm's default weights of CACHED (our seeded
    file, laid out as hf_hub_download leaves it), made the process's cache while the module
    runs: DEFAULT must read it there, and find nothing else there."""
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hub")
    repo = get_pretrained_cfg(CACHED).hf_hub_id
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(weights[CACHED], folder / "snapshots" / commit / "model.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        yield folder / "snapshots" / commit / "model.safetensors"


class LoadTimes(logging.Handler):
    """The worker's "loaded NAME (...) in Xs" lines, for the report."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("loaded "):
            self.lines.append(record.getMessage())


BAD = {
    "unknown": dict(arch="convnext_atoo"),
    "not_fitting": dict(arch="convnext_atto", weights="efficientnet_b0"),
    "not_cached": dict(arch="efficientnet_b0", weights="DEFAULT"),
    "enum_name": dict(arch="resnet18d", weights="IMAGENET1K_V1"),
    "non_square": dict(arch="convnext_atto", weights="convnext_atto", input_size=(160, 224)),
}


@pytest.fixture(scope="module")
def server(weights: dict[str, Path], hub_cache: Path) -> Iterator[RunningServer]:
    models = [
        ModelConfig(
            name=a,
            source="timm",
            arch=a,
            kwargs=s.kwargs,
            weights=str(weights[a]),
            channels_last=s.channels_last,
        )
        for a, s in SPECS.items()
    ]
    models.append(ModelConfig(name="cached", source="timm", arch=CACHED, weights="DEFAULT"))
    for name, entry in BAD.items():
        given = dict(entry)
        if given.get("weights") in SPECS:
            given["weights"] = str(weights[given["weights"]])
        models.append(ModelConfig(name=name, source="timm", **given))
    settings = Settings(port=0, max_batch_size=4, max_wait_ms=5, warmup=False, models=tuple(models))
    times, logger = LoadTimes(), logging.getLogger("layertap.server.worker")
    level = logger.level
    logger.addHandler(times)
    logger.setLevel(logging.INFO)
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            running = start_server(settings)
    finally:
        logger.removeHandler(times)
        logger.setLevel(level)
    print(f"\nserver with {len(models)} entries up in {time.monotonic() - started:.1f}s")
    print("\n".join(times.lines))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def infos(server: RunningServer) -> dict[str, pb.ModelInfo]:
    return {m.name: m for m in server.stub().ListModels(pb.ListModelsRequest(), timeout=30).models}


# --- tests ---------------------------------------------------------------------------------
def test_models_load_with_timms_description(
    infos: dict[str, pb.ModelInfo], weights: dict[str, Path]
) -> None:
    """Each model is described as timm describes it: its data config's size, resize
    (floor(size / crop_pct), shorter side for crop_mode "center"), interpolation, mean/std,
    num_prefix_tokens; the digest is the weights file's."""
    for arch, spec in SPECS.items():
        info = infos[arch]
        assert (info.ready, info.status_message, info.source) == (True, "", "timm"), arch
        assert info.weights == f"{arch}.safetensors" and not info.random_weights
        assert info.weights_sha256 == sha256_file(weights[arch])
        config = timm.data.resolve_data_config({}, model=timm_model(spec))
        size = config["input_size"][1:]
        if "img_size" in spec.kwargs:  # timm's config keeps the pretrained size
            size = (spec.kwargs["img_size"],) * 2
        p = info.preprocessing
        assert tuple(info.input_size) == tuple(p.crop_size) == tuple(size), arch
        assert p.resize_size == math.floor(size[0] / config["crop_pct"]), arch
        assert config["crop_mode"] == "center" and p.resize_mode == "shorter"
        assert p.interpolation == config["interpolation"] and p.resize_kernel == "uint8"
        np.testing.assert_allclose(p.mean, config["mean"], rtol=1e-6)
        np.testing.assert_allclose(p.std, config["std"], rtol=1e-6)
        assert info.prefix_tokens == spec.prefix, arch


def test_served_input_is_timms_transform(server: RunningServer) -> None:
    """The input the server makes of each photo (its described preprocessing, its kernel) is
    timm's create_transform of the PIL photo within one uint8 level per value."""
    report = []
    for arch, spec in SPECS.items():
        prep = server.server.runtime.model(arch).weights.preprocessing
        model = timm_model(spec)
        args = {"img_size": spec.kwargs["img_size"]} if "img_size" in spec.kwargs else {}
        for name in PHOTOS:
            ours = preprocess(torch.from_numpy(photo(name)).permute(2, 0, 1), prep)
            theirs = timm_input(model, name, args)
            assert ours.shape == theirs.shape, (arch, name)
            levels = levels_apart(ours, theirs, prep.std)
            report.append(f"{arch}/{name}: {int((levels > 0).sum())} of {levels.numel()} off by 1")
    print("\n" + "\n".join(report))


def picked_nodes(description: pb.DescribeModelResponse, spec: Spec) -> list[str]:
    """Early, middle and last float nodes of the catalogue, plus the spec's own."""
    names = [n.name for n in description.nodes if n.dtype == "float32"]
    return [names[len(names) // 8], names[len(names) // 2], names[-1], *spec.nodes]


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_timm(arch: str, server: RunningServer, weights: dict[str, Path]) -> None:
    """Raw outputs of three or more nodes per model, over gRPC from uint8 photos, equal timm's
    create_feature_extractor on the same weights and the served input."""
    spec = SPECS[arch]
    started = time.perf_counter()
    description = server.stub().DescribeModel(pb.DescribeModelRequest(model=arch), timeout=60)
    described_s = time.perf_counter() - started
    assert description.extraction_mode == "fx", description.extraction_reason
    requested = picked_nodes(description, spec)
    photos = [photo(n) for n in PHOTOS]
    with FeatureClient(server.target) as client:
        served = client.extract(photos, model=arch, nodes=requested)
    full = [served.nodes[r] for r in requested]
    x = served_inputs(server, arch, photos)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = create_feature_extractor(reference(spec, weights[arch]), return_nodes=full)
    with torch.inference_mode():
        want = extractor(x)
    errors = {
        r: close(served[r], want[f], f"{arch} {f}") for r, f in zip(requested, full, strict=True)
    }
    print(
        f"\n{arch}: describe {described_s:.2f}s, max rel err "
        + ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
    )


def test_token_pools_skip_the_prefix_tokens(
    server: RunningServer, weights: dict[str, Path]
) -> None:
    """cls is token 0 and mean averages the patch tokens only: the registers and CLS of the
    DINOv2-style ViT (5) and EVA-02's CLS (1) are skipped; an NHWC map's avg (ConvNeXt's
    LayerNorm) averages over H and W."""
    photos = [photo(n) for n in PHOTOS]
    with FeatureClient(server.target) as client:
        for arch, spec in SPECS.items():
            if not spec.tokens:
                continue
            x = served_inputs(server, arch, photos)
            with torch.inference_mode():
                tokens = reference(spec, weights[arch]).forward_features(x)
            cls = client.extract(photos, model=arch, nodes=spec.tokens, pool="cls")
            mean = client.extract(photos, model=arch, nodes=spec.tokens, pool="mean")
            assert cls.nodes[spec.tokens].startswith(spec.tokens)  # timm's LayerNorm: .layer_norm
            close(cls[spec.tokens], tokens[:, 0], f"{arch} cls")
            close(mean[spec.tokens], tokens[:, spec.prefix :].mean(1), f"{arch} mean")
        node = "stem.1.layer_norm"
        described = server.stub().DescribeModel(pb.DescribeModelRequest(model="convnext_atto"))
        assert {n.name: n.layout for n in described.nodes}[node] == "NHWC"
        raw = client.extract(photos, model="convnext_atto", nodes=node)[node]
        avg = client.extract(photos, model="convnext_atto", nodes=node, pool="avg")[node]
    assert raw.shape[1:] == (56, 56, 40)
    np.testing.assert_allclose(avg, raw.mean((1, 2)), rtol=1e-4, atol=1e-5)


def test_swin_maps_are_described_nhwc(server: RunningServer) -> None:
    """timm's Swin fixes its input size, so no probe can tell its map layout; timm's output_fmt
    says NHWC: the stage outputs are NHWC (and avg pools over H and W), the patch embedding's
    convolution stays NCHW."""
    arch = "swin_tiny_patch4_window7_224"
    described = server.stub().DescribeModel(pb.DescribeModelRequest(model=arch))
    layouts = {n.name: (n.layout, tuple(n.shape)) for n in described.nodes}
    stage = [n for n in layouts if n.startswith("layers.1.")][-1]  # what "layers.1" resolves to
    assert layouts["patch_embed.proj"] == ("NCHW", (1, 96, 32, 32))
    assert layouts[stage] == ("NHWC", (1, 16, 16, 192)), stage
    assert layouts["norm"] == ("NHWC", (1, 4, 4, 768))
    photos = [photo(n) for n in PHOTOS]
    with FeatureClient(server.target) as client:
        raw = client.extract(photos, model=arch, nodes="layers.1")["layers.1"]
        avg = client.extract(photos, model=arch, nodes="layers.1", pool="avg")["layers.1"]
    np.testing.assert_allclose(avg, raw.mean((1, 2)), rtol=1e-4, atol=1e-5)


def test_default_weights_come_from_the_local_cache(
    server: RunningServer, infos: dict[str, pb.ModelInfo], hub_cache: Path
) -> None:
    """weights = "DEFAULT": timm's pretrained weights read from the local hub cache through
    timm's own loading (never downloaded), digested from that file; the same weights as the
    file entry, so the same outputs."""
    info = infos["cached"]
    assert info.ready and not info.random_weights, info.status_message
    assert info.weights == f"{CACHED}.{get_pretrained_cfg(CACHED).tag}"
    assert info.weights_sha256 == sha256_file(hub_cache)
    with FeatureClient(server.target) as client:
        a = client.extract(photo("coffee"), model="cached", nodes="blocks.2")
        b = client.extract(photo("coffee"), model=CACHED, nodes="blocks.2")
    np.testing.assert_array_equal(a["blocks.2"], b["blocks.2"])


def test_bad_configs_fail_with_clear_load_errors(infos: dict[str, pb.ModelInfo]) -> None:
    """What users get wrong fails that entry's load (the others serve) with what to fix."""
    expected = {
        "unknown": ["'convnext_atoo' is not a timm model", "closest timm names: convnext_atto"],
        "not_fitting": ["does not fit timm's convnext_atto", "Missing key(s)"],
        "not_cached": [
            "timm's pretrained weights for efficientnet_b0 are not in the local cache",
            "models--timm--efficientnet_b0",
            "no downloads",
            "allow_random = true",
        ],
        "enum_name": ["weights 'IMAGENET1K_V1'", "DEFAULT", "pretrained tag goes in arch"],
        "non_square": ["ResizeKeepRatio", "set resize_mode", "square input_size"],
    }
    for name, parts in expected.items():
        info = infos[name]
        assert not info.ready
        for part in parts:
            assert part in info.status_message, (name, info.status_message)


def test_direct_builds_random_pth_and_refusals(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DEFAULT not cached with allow_random: random init, said in the note. A .pth file loads
    with weights_only (a pickled object in it is refused). Entries that would make timm fetch
    or read weights itself are refused."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = ModelConfig(name="m", source="timm", arch=CACHED, weights="DEFAULT", allow_random=True)
    built = build_model(cfg)
    assert built.random and built.sha256 == "random" and "not cached" in built.note
    pth = tmp_path / "m.pth"
    torch.save(built.module.state_dict(), pth)
    again = build_model(ModelConfig(name="m", source="timm", arch=CACHED, weights=str(pth)))
    assert again.sha256 == sha256_file(pth) and not again.random
    torch.save({"state_dict": built.module.state_dict(), "note": Path("x")}, pth)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        build_model(ModelConfig(name="m", source="timm", arch=CACHED, weights=str(pth)))
    with pytest.raises(ModelLoadError, match="needs allow_random"):
        build_model(ModelConfig(name="m", source="timm", arch=CACHED, weights="none"))
    with pytest.raises(ModelLoadError, match="kwargs pretrained are not accepted"):
        build_model(ModelConfig(name="m", source="timm", arch=CACHED, kwargs={"pretrained": True}))
    with pytest.raises(ModelLoadError, match=r"timm\.list_models"):
        build_model(ModelConfig(name="m", source="timm", arch="hf-hub:timm/resnet18.a1_in1k"))


# --- preprocessing cases without a server -------------------------------------------------
def meta_model(arch: str, **kwargs: Any) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, **kwargs)


@pytest.mark.parametrize(
    ("arch", "input_size", "expected"),
    [
        # crop_mode squash, crop_pct 1.0: both sides to 384
        ("convnext_tiny.fb_in22k_ft_in1k_384", None, (384, (384, 384), "squash", "bicubic")),
        # squash to a non-square size: each side floor(size / crop_pct)
        ("convnext_tiny.fb_in22k_ft_in1k_384", (192, 256), (192, (192, 256), "squash", "bicubic")),
        # an input_size override: resize floor(160 / 0.875), as timm's own input_size argument
        ("convnext_atto", (160, 160), (182, (160, 160), "shorter", "bicubic")),
        ("resnet50.tv_in1k", None, (256, (224, 224), "shorter", "bilinear")),  # bilinear
        ("resnet50.a1_in1k", None, (235, (224, 224), "shorter", "bicubic")),  # crop_pct 0.95
    ],
)
def test_preprocessing_follows_timms_transform(
    arch: str, input_size: tuple[int, int] | None, expected: tuple[Any, ...]
) -> None:
    """timm's data config as its eval transform applies it, within one level of
    create_transform on the PIL photo, for the crop modes and sizes Preprocessing expresses."""
    from layertap.server.sources.timm_models import timm_preprocessing

    model = meta_model(arch)
    prep = timm_preprocessing(ModelConfig(name="m", arch=arch, input_size=input_size), model)
    assert (prep.resize_size, prep.crop_size, prep.resize_mode, prep.interpolation) == expected
    args = {"input_size": (3, *input_size)} if input_size else {}
    for name in PHOTOS:
        ours = preprocess(torch.from_numpy(photo(name)).permute(2, 0, 1), prep)
        theirs = timm_input(model, name, args)
        levels_apart(ours, theirs, prep.std)


@pytest.mark.parametrize(
    ("change", "message", "fix"),
    [
        ({"crop_mode": "border"}, "crop_mode 'border'", {"resize_mode": "shorter"}),
        ({"interpolation": "lanczos"}, "interpolation 'lanczos'", {"interpolation": "bicubic"}),
    ],
)
def test_descriptions_preprocessing_lacks_fail_the_load(
    change: dict[str, str], message: str, fix: dict[str, str]
) -> None:
    """Never approximated: a crop mode or interpolation Preprocessing lacks is a load error
    naming the entry keys that would replace it; with those keys set, the entry's choice is
    served."""
    from layertap.server.sources.timm_models import timm_preprocessing

    model = meta_model("convnext_atto")
    model.pretrained_cfg = {**model.pretrained_cfg, **change}
    with pytest.raises(ModelLoadError, match=message) as err:
        timm_preprocessing(ModelConfig(name="m", arch="convnext_atto"), model)
    key = next(iter(fix))
    assert f"set {key}" in str(err.value)
    prep = timm_preprocessing(ModelConfig(name="m", arch="convnext_atto", **fix), model)
    assert isinstance(prep, Preprocessing) and prep.crop_size == (224, 224)
