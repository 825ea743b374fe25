"""source = "huggingface": save_pretrained() directories served with the library's own weights,
preprocessing and module names.

Six tiny models are built offline from configs (no download) with seeded random weights
(BatchNorm statistics and zero-initialised tensors randomised: conftest.randomise_trivial_init)
and saved with a matching image processor beside them. One server holds them all, plus the bad
directories users will write. References are the library's own: the model loaded back with
from_pretrained, forward hooks on the same modules, and the directory's AutoImageProcessor
applied to the PIL photo; the server gets the photo's uint8 pixels, so its own preprocessing is
part of what is compared.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import RunningServer, photo, randomise_trivial_init, relative_error, start_server
from PIL import Image
from test_parity import hooked_forward
from torch import nn

from layertap.server.models import ModelLoadError, sha256_file, sha256_files
from layertap.server.preprocess import preprocess
from layertap.server.settings import ModelConfig, Settings
from layertap.server.sources import build_model
from layertap.v1 import layertap_pb2 as pb

transformers = pytest.importorskip("transformers")

RTOL = 1e-4  # max |served - reference| <= RTOL x max |reference|
PHOTOS = ("china", "chelsea")  # china: 427x640, an odd crop margin (HF floors the offset)
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
VIT = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "image_size": 64}


@dataclass(frozen=True)
class Case:
    make: Callable[[], tuple[nn.Module, Any]]  # (model, image processor), built offline
    nodes: tuple[str, ...]  # module paths compared with the reference's hooks
    cls_pool: str = ""  # an NLC node whose cls/mean pools are checked
    prefix: int = 0  # leading CLS/register tokens


def _vit() -> tuple[nn.Module, Any]:
    config = transformers.ViTConfig(**VIT, intermediate_size=96, patch_size=16)
    return transformers.ViTModel(config), transformers.ViTImageProcessor(
        size={"height": 64, "width": 64}
    )


def _dinov2_registers() -> tuple[nn.Module, Any]:
    config = transformers.Dinov2WithRegistersConfig(
        **VIT, mlp_ratio=2, patch_size=16, num_register_tokens=4
    )
    processor = transformers.BitImageProcessor(
        size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64}, **IMAGENET
    )
    return transformers.Dinov2WithRegistersModel(config), processor


def _clip_processor() -> Any:
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
    )


def _clip_vision() -> tuple[nn.Module, Any]:
    config = transformers.CLIPVisionConfig(**VIT, intermediate_size=96, patch_size=16)
    return transformers.CLIPVisionModel(config), _clip_processor()


def _clip_full() -> tuple[nn.Module, Any]:
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.CLIPConfig(
        text_config={
            **text,
            "intermediate_size": 64,
            "vocab_size": 64,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**VIT, "intermediate_size": 96, "patch_size": 16},
        projection_dim=24,
    )
    return transformers.CLIPModel(config), _clip_processor()


def _convnext() -> tuple[nn.Module, Any]:
    config = transformers.ConvNextConfig(
        hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 2, 1], layer_scale_init_value=0.5
    )
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    return transformers.ConvNextModel(config), processor


def _resnet() -> tuple[nn.Module, Any]:
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 1, 1]
    )
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    return transformers.ResNetModel(config), processor


CASES: dict[str, Case] = {
    "vit": Case(
        _vit,
        ("embeddings", "layers.0", "layers.1.mlp.fc1", "layernorm", "pooler"),
        cls_pool="layernorm",
        prefix=1,
    ),
    "dinov2_reg": Case(
        _dinov2_registers,
        ("embeddings", "encoder.layer.0", "encoder.layer.1.mlp", "layernorm"),
        cls_pool="layernorm",
        prefix=5,
    ),
    "clip_vision": Case(
        _clip_vision,
        ("pre_layrnorm", "encoder.layers.1", "post_layernorm"),
        cls_pool="encoder.layers.1",
        prefix=1,
    ),
    "convnext": Case(
        _convnext, ("embeddings", "encoder.stages.1", "encoder.stages.3", "layernorm")
    ),
    "resnet": Case(_resnet, ("embedder", "encoder.stages.1", "encoder.stages.3", "pooler")),
}
# a whole CLIPModel directory: served as its vision tower with the projection
CLIP_FULL_NODES = (
    "vision_model.encoder.layers.0",
    "vision_model.post_layernorm",
    "visual_projection",
)


def _save(folder: Path, make: Callable[[], tuple[nn.Module, Any]], **save: Any) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, processor = make()
        randomise_trivial_init(model.eval())
        model.save_pretrained(folder, **save)
        processor.save_pretrained(folder)
    return folder


def _without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst)
    for name in names:
        (dst / name).unlink()
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {name: _save(root / name, case.make) for name, case in CASES.items()}
    out["clip_full"] = _save(root / "clip_full", _clip_full)
    out["resnet_sharded"] = _save(root / "resnet_sharded", _resnet, max_shard_size="40KB")
    # the bad directories users write
    out["no_weights"] = _without(out["vit"], root / "no_weights", "model.safetensors")
    out["no_processor"] = _without(out["vit"], root / "no_processor", "preprocessor_config.json")
    remote = _without(out["vit"], root / "remote")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_mine.MineModel"}
    (remote / "config.json").write_text(json.dumps(config))
    out["remote"] = remote
    processors = {  # image processors Preprocessing cannot reproduce
        "lanczos": transformers.ViTImageProcessor(size={"height": 64, "width": 64}, resample=1),
        "no_crop": transformers.CLIPImageProcessor(
            size={"shortest_edge": 64}, do_center_crop=False
        ),
        "beit": transformers.BeitImageProcessor(size={"height": 64, "width": 64}),
    }
    for name, processor in processors.items():
        out[name] = _without(out["vit"], root / name)
        processor.save_pretrained(out[name])
    return out


BAD = {  # entry name -> (its keys beyond source/path, the words its load error must hold)
    "no_weights": ({}, "has no weights file (model.safetensors"),
    "no_processor": ({}, "has no preprocessor_config.json"),
    "remote": ({}, "trust_remote_code is not supported"),
    "missing_dir": ({}, "is not a directory"),
    "lanczos": ({}, "set interpolation = 'bicubic'"),
    "no_crop": ({}, "without a crop (the input size varies)"),
    "beit": ({}, "BeitImageProcessor transforms images in its own way"),
    "file_weights": ({"weights": "model.safetensors"}, "weights are its directory's own files"),
}


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path]) -> Iterator[RunningServer]:
    hf = {"source": "huggingface", "channels_last": False}
    entries = [ModelConfig(name=n, path=str(dirs[n]), **hf) for n in (*CASES, "clip_full")]
    entries += [
        ModelConfig(name="resnet_sharded", path=str(dirs["resnet_sharded"]), **hf),
        ModelConfig(
            name="lanczos_overridden", path=str(dirs["lanczos"]), interpolation="bicubic", **hf
        ),
        ModelConfig(name="random", path=str(dirs["vit"]), weights="none", allow_random=True, **hf),
    ]
    for name, (keys, _) in BAD.items():
        path = dirs.get(name, dirs["vit"] if name == "file_weights" else Path("/nonexistent/hf"))
        entries.append(ModelConfig(name=name, source="huggingface", path=str(path), **keys))
    running = start_server(Settings(port=0, max_batch_size=4, max_wait_ms=5, models=tuple(entries)))
    yield running
    running.stop()


# --- references ---------------------------------------------------------------------------------
def _reference(folder: Path, cls: Any = None) -> tuple[nn.Module, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = (cls or transformers.AutoModel).from_pretrained(folder, local_files_only=True)
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return model.eval(), processor


def _pixels(processor: Any) -> torch.Tensor:
    images = [Image.fromarray(photo(name)) for name in PHOTOS]
    return processor(images, return_tensors="pt")["pixel_values"]


def _images() -> list[pb.Image]:
    """The photos' uint8 pixels: the server resizes and normalises them itself."""
    out = []
    for name in PHOTOS:
        arr = np.ascontiguousarray(photo(name))
        out.append(
            pb.Image(tensor=pb.Tensor(dtype="uint8", shape=list(arr.shape), data=arr.tobytes()))
        )
    return out


def _extract(
    server: RunningServer, model: str, nodes: list[str], **kw: Any
) -> list[list[np.ndarray]]:
    request = pb.ExtractRequest(model=model, images=_images(), nodes=nodes, **kw)
    response = server.stub().Extract(request, timeout=120)
    return [
        [np.frombuffer(o.tensor.data, "<f4").reshape(tuple(o.tensor.shape)) for o in r.outputs]
        for r in response.results
    ]


def _rel_err(got: np.ndarray, want: torch.Tensor, what: str) -> float:
    return relative_error(got, want, what, RTOL)


# --- tests --------------------------------------------------------------------------------------
def test_models_load_with_their_digest_prefix_and_preprocessing(
    server: RunningServer, dirs: dict[str, Path]
) -> None:
    models = {
        m.name: m for m in server.stub().ListModels(pb.ListModelsRequest(), timeout=30).models
    }
    good = [*CASES, "clip_full", "resnet_sharded", "lanczos_overridden", "random"]
    assert {n: models[n].ready for n in good} == dict.fromkeys(good, True)
    for name in CASES:
        info = models[name]
        assert info.source == "huggingface" and not info.random_weights
        assert info.weights == name
        assert info.weights_sha256 == sha256_file(dirs[name] / "model.safetensors")
        assert info.prefix_tokens == CASES[name].prefix, name
    shards = sorted((dirs["resnet_sharded"]).glob("model-*.safetensors"))
    assert len(shards) > 1
    assert models["resnet_sharded"].weights_sha256 == sha256_files(shards)
    assert models["random"].random_weights and models["random"].weights_sha256 == "random"
    assert models["clip_full"].status_message.startswith("CLIPVisionModelWithProjection")
    vit = models["vit"].preprocessing  # ViTImageProcessor: squash to 64x64, bilinear, 0.5s
    assert (vit.resize_mode, vit.interpolation, list(vit.crop_size)) == (
        "squash",
        "bilinear",
        [64, 64],
    )
    np.testing.assert_allclose(vit.mean, [0.5] * 3)
    convnext = models["convnext"].preprocessing  # crop_pct 0.875: shorter side 73, crop 64
    assert (convnext.resize_size, convnext.resize_mode, convnext.interpolation) == (
        73,
        "shorter",
        "bicubic",
    )
    assert models["lanczos_overridden"].preprocessing.interpolation == "bicubic"
    # HF image processors crop at (size - crop) // 2; clients are told
    assert convnext.crop_offset == "floor"
    assert {m.name: m.preprocessing.crop_offset for m in models.values()}["clip_vision"] == "floor"


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_describe_says_hooks_and_why(server: RunningServer, name: str) -> None:
    response = server.stub().DescribeModel(pb.DescribeModelRequest(model=name), timeout=30)
    assert response.extraction_mode == "hooks"
    assert "has no fx tracer" in response.extraction_reason
    assert "torch.fx cannot trace it" in response.extraction_reason
    assert set(CASES[name].nodes) <= {n.name for n in response.nodes}


@pytest.mark.parametrize("name", list(CASES))
def test_served_input_equals_the_image_processors(
    server: RunningServer, dirs: dict[str, Path], name: str
) -> None:
    """Bit for bit in uint8 terms: the resize is torchvision's uint8 kernel on both sides and
    the crop offset floored as HF does; normalisation differs by float rounding only."""
    _, processor = _reference(dirs[name])
    want = _pixels(processor)
    spec = server.server.runtime.model(name).weights.preprocessing
    std = torch.tensor(spec.std).view(3, 1, 1)
    for i, name_ in enumerate(PHOTOS):
        got = preprocess(torch.from_numpy(photo(name_).copy()).permute(2, 0, 1).contiguous(), spec)
        assert got.shape == want[i].shape
        levels = float(((got - want[i]).abs() * std * 255).max())
        assert levels < 1e-3, f"{name} {name_}: {levels:.3g} uint8 levels apart"


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_the_library(server: RunningServer, dirs: dict[str, Path], name: str) -> None:
    case = CASES[name]
    model, processor = _reference(dirs[name])
    want = hooked_forward(model, list(case.nodes), _pixels(processor))
    got = _extract(server, name, list(case.nodes))
    errors = [
        _rel_err(out, want[node][i], f"{name} {node} image {i}")
        for i, outputs in enumerate(got)
        for node, out in zip(case.nodes, outputs, strict=True)
    ]
    print(f"{name}: max rel err {max(errors):.2e} over {len(case.nodes)} nodes")
    if case.cls_pool:
        tokens = want[case.cls_pool]
        pools = {
            pb.POOLING_CLS: tokens[:, 0],
            pb.POOLING_MEAN: tokens[:, case.prefix :].mean(1),
        }
        for pool, ref in pools.items():
            out = _extract(server, name, [case.cls_pool], output=pb.OutputOptions(pool=pool))
            for i in range(len(PHOTOS)):
                _rel_err(out[i][0], ref[i], f"{name} {case.cls_pool} {pb.Pooling.Name(pool)}")


def test_a_clip_model_directory_serves_its_vision_tower(
    server: RunningServer, dirs: dict[str, Path]
) -> None:
    """CLIPModel's directory: the vision tower with its projection (CLIPVisionModelWithProjection
    names), equal to CLIPModel's own get_image_features; the text tower is not loaded."""
    model, processor = _reference(dirs["clip_full"], transformers.CLIPModel)
    x = _pixels(processor)
    tower = hooked_forward(model.vision_model, ["encoder.layers.0", "post_layernorm"], x)
    want = {f"vision_model.{path}": out for path, out in tower.items()}
    with torch.inference_mode():
        features = model.get_image_features(pixel_values=x)
    want["visual_projection"] = getattr(features, "pooler_output", features)
    got = _extract(server, "clip_full", list(CLIP_FULL_NODES))
    for i, outputs in enumerate(got):
        for node, out in zip(CLIP_FULL_NODES, outputs, strict=True):
            _rel_err(out, want[node][i], f"clip_full {node} image {i}")


@pytest.mark.parametrize("name", list(BAD))
def test_bad_directories_fail_to_load_with_what_to_fix(server: RunningServer, name: str) -> None:
    models = {
        m.name: m for m in server.stub().ListModels(pb.ListModelsRequest(), timeout=30).models
    }
    assert not models[name].ready
    assert BAD[name][1] in models[name].status_message, models[name].status_message


class _Payload:
    """Not a tensor: a pickled instance of it must never be unpickled."""


def test_a_bin_checkpoint_loads_weights_only(dirs: dict[str, Path], tmp_path: Path) -> None:
    """pytorch_model.bin (no safetensors beside it) loads through torch.load(weights_only=True)
    and is what the digest covers; one holding a pickled object is refused."""
    from safetensors.torch import load_file

    folder = _without(dirs["resnet"], tmp_path / "bin", "model.safetensors")
    torch.save(load_file(dirs["resnet"] / "model.safetensors"), folder / "pytorch_model.bin")
    built = build_model(ModelConfig(name="bin", source="huggingface", path=str(folder)))
    assert built.sha256 == sha256_file(folder / "pytorch_model.bin")
    reference, _ = _reference(dirs["resnet"])
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(built.module(x).pooler_output, reference(x).pooler_output)
    torch.save({"payload": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"cannot load ResNetModel .*holds pickled objects"):
        build_model(ModelConfig(name="pickled", source="huggingface", path=str(folder)))
