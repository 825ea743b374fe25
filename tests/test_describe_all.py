"""The node catalogue (DescribeModel) for every torchvision classification model.

The expected node list is computed independently of layertap's catalogue code: torchvision's own
``get_graph_node_names`` (eval names) and ``create_feature_extractor`` returning every eval node,
run on meta tensors at two batch sizes (3 and 5). A node is "batch-dependent" when its output is a
tensor whose leading dimension follows the batch size in both runs; that excludes shapes, ints,
weights (``…qkv_weight``, ``…layer_scale``) and anything not computed from the input.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torchvision
from conftest import RunningServer, start_server
from torch import nn
from torchvision.models import get_model, get_model_weights
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from layertap.server.catalog import Catalog, build_catalog, build_extractor
from layertap.server.errors import UnknownNode
from layertap.server.settings import ModelConfig, Settings
from layertap.server.sources import build_model
from layertap.v1 import layertap_pb2 as pb

ALL_MODELS = sorted(torchvision.models.list_models(module=torchvision.models))
LAYOUTS = {"NCHW", "NHWC", "NLC", "NC", ""}


def meta_model(name: str) -> nn.Module:
    """The architecture with meta parameters (no memory, no init). RegNet computes its block
    widths with ``.tolist()`` at construction, which meta tensors refuse: those are built for real
    and then moved to meta."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = get_model(name, weights=None)
        except NotImplementedError:
            model = get_model(name, weights=None).to("meta")
    assert all(p.is_meta for p in model.parameters())
    return model.eval()


def expected_input_size(name: str, model: nn.Module) -> tuple[int, int]:
    """What the server uses for a random-init `arch` entry: the DEFAULT weights' crop size, except
    a model that carries its own ``image_size`` (ViT is built for that size, not the weights')."""
    image_size = getattr(model, "image_size", None)
    if isinstance(image_size, int):
        return image_size, image_size
    crop = list(get_model_weights(name).DEFAULT.transforms().crop_size)
    return (crop[0], crop[-1])


def batch_dependent_nodes(
    model: nn.Module, size: tuple[int, int]
) -> tuple[list[str], dict[str, Any]]:
    """torchvision's eval node names whose output is a tensor with the batch as dim 0 (at batch 3
    and batch 5), in graph order, plus the batch-3 outputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "eval nodes are a subsequence of train nodes"
        train_names, eval_names = get_graph_node_names(model)
        extractor = create_feature_extractor(
            model, train_return_nodes=[train_names[-1]], eval_return_nodes=eval_names
        ).eval()
    outs = {b: extractor(torch.empty(b, 3, *size, device="meta")) for b in (3, 5)}
    model.eval()

    def follows_batch(name: str) -> bool:
        return all(
            isinstance(outs[b][name], torch.Tensor)
            and outs[b][name].dim() > 0
            and outs[b][name].shape[0] == b
            for b in outs
        )

    assert list(outs[3]) == eval_names
    return [n for n in eval_names if follows_batch(n)], outs[3]


def assert_catalog_matches(name: str, model: nn.Module, catalog: Catalog) -> None:
    size = expected_input_size(name, model)
    expected, outs = batch_dependent_nodes(model, size)
    # The input placeholder is batch-dependent too, but build_catalog leaves it out on purpose
    # (it is the request itself): assert exactly that, and that it resolves to nothing.
    placeholder = expected[0]
    assert placeholder == "x" and placeholder in expected
    names = [n.name for n in catalog.nodes]
    assert placeholder not in names
    with pytest.raises(UnknownNode, match="model input itself"):
        catalog.resolve(placeholder)
    assert names == [n for n in expected if n != placeholder]
    for spec in catalog.nodes:
        out = outs[spec.name]
        assert spec.shape == (1, *out.shape[1:]), spec
        assert spec.dtype == str(out.dtype).removeprefix("torch."), spec
        assert spec.layout in LAYOUTS, spec
        assert spec.op in ("call_module", "call_function", "call_method"), spec


# --- every model (slow) ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_catalog_of_every_model(name: str) -> None:
    model = meta_model(name)
    catalog = build_catalog(model, expected_input_size(name, model))
    assert catalog.input_size == expected_input_size(name, model)
    assert_catalog_matches(name, model, catalog)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize("name", ALL_MODELS)
def test_server_build_of_every_model(name: str) -> None:
    """All 80 models built as the server builds them (real random init, ~3 min on 2 cores), and
    the catalogue of the real model (fake-tensor shape propagation, the server's path) equals the
    catalogue of the meta model checked above."""
    loaded = build_model(ModelConfig(name=name, arch=name, weights="none", allow_random=True))
    assert loaded.random and loaded.weights_id == "random" and loaded.sha256 == "random"
    assert not loaded.module.training
    size = loaded.preprocessing.crop_size
    assert size == expected_input_size(name, loaded.module)
    real = build_catalog(loaded.module, size)
    meta = build_catalog(meta_model(name), size)
    assert real.nodes == meta.nodes
    assert real.all_names == meta.all_names
    assert not any(p.is_meta for p in loaded.module.parameters())


# --- fast checks -------------------------------------------------------------------------------
def test_describe_vit_h_14_needs_no_real_forward() -> None:
    """Describing runs on a meta-device model, which cannot compute: shapes come from shape
    propagation alone (its time is measured by bench/describe_bench.py, not asserted here)."""
    model = meta_model("vit_h_14")
    assert all(p.is_meta for p in model.parameters())
    catalog = build_catalog(model, expected_input_size("vit_h_14", model))
    assert catalog.by_name["encoder.ln"].shape == (1, 257, 1280)


def test_catalog_matches_torchvision_sample() -> None:
    """The non-slow slice of test_catalog_of_every_model (includes the meta fallback: regnet)."""
    for name in ("resnet18", "vit_b_16", "swin_t", "regnet_y_400mf", "inception_v3"):
        model = meta_model(name)
        assert_catalog_matches(name, model, build_catalog(model, expected_input_size(name, model)))


def _layouts(catalog: Catalog, names: list[str]) -> dict[str, str]:
    return {n: catalog.by_name[catalog.resolve(n)].layout for n in names}


@pytest.mark.parametrize(
    ("arch", "layouts"),
    [
        (
            "resnet18",
            {
                "conv1": "NCHW",
                "layer1": "NCHW",
                "layer2.0.add": "NCHW",
                "layer4": "NCHW",
                "avgpool": "NCHW",
                "flatten": "NC",
                "fc": "NC",
            },
        ),
        (
            "swin_t",
            {
                "features.0.0": "NCHW",
                "features.1": "NHWC",
                "features.3": "NHWC",
                "features.5": "NHWC",
                "features.7": "NHWC",
                "norm": "NHWC",
                "permute": "NCHW",
                "head": "NC",
            },
        ),
        (
            "vit_b_16",
            {
                "conv_proj": "NCHW",
                "encoder.layers.encoder_layer_0": "NLC",
                "encoder.layers.encoder_layer_11": "NLC",
                "encoder.ln": "NLC",
                "heads.head": "NC",
            },
        ),
        (
            "mobilenet_v3_small",
            {
                "features.0": "NCHW",
                "features.6": "NCHW",
                "features.12": "NCHW",
                "avgpool": "NCHW",
                "classifier.0": "NC",
                "classifier.3": "NC",
            },
        ),
    ],
)
def test_catalog_shapes_match_real_forward(arch: str, layouts: dict[str, str]) -> None:
    """Real random-init model: every catalogue shape equals the real output at batch 1."""
    torch.manual_seed(0)
    model = get_model(arch, weights=None).eval()
    size = expected_input_size(arch, model)
    catalog = build_catalog(model, size)
    names = [n.name for n in catalog.nodes]
    extractor = build_extractor(catalog, names)
    x = torch.randn(1, 3, *size)
    with torch.inference_mode():
        outputs = extractor(x)
        logits = model(x)
    assert list(outputs) == names
    for spec in catalog.nodes:
        out = outputs[spec.name]
        assert tuple(out.shape) == spec.shape, spec
        assert str(out.dtype).removeprefix("torch.") == spec.dtype, spec
    assert _layouts(catalog, list(layouts)) == layouts
    torch.testing.assert_close(outputs[names[-1]], logits, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def random_resnet_server() -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        models=(ModelConfig(name="r18", arch="resnet18", weights="none", allow_random=True),),
    )
    running = start_server(settings)
    yield running
    running.stop()


def test_describe_rpc(random_resnet_server: RunningServer) -> None:
    stub = random_resnet_server.stub()
    response = stub.DescribeModel(pb.DescribeModelRequest(model="r18"), timeout=30)
    model = meta_model("resnet18")
    catalog = build_catalog(model, (224, 224))
    assert response.extraction_mode == "fx"
    assert [
        (n.name, tuple(n.shape), n.dtype, n.layout, n.op, n.target) for n in response.nodes
    ] == [(n.name, n.shape, n.dtype, n.layout, n.op, n.target) for n in catalog.nodes]
    assert all(n.shape[0] == 1 for n in response.nodes)
    by_name = {n.name: n for n in response.nodes}
    assert tuple(by_name["layer1.0.conv1"].shape) == (1, 64, 56, 56)
    assert by_name["layer4.1.add"].target == "add" and by_name["fc"].target == "Linear"
    modules = [(m.name, m.type) for m in response.modules]
    assert ("layer1.0.conv1", "Conv2d") in modules
    assert modules[0] == ("", "ResNet")
    assert {m.name: m.own_parameters for m in response.modules}["fc"] == 512 * 1000 + 1000
    assert response.model.name == "r18" and response.model.random_weights

    (info,) = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    assert info.name == "r18" and info.architecture == "resnet18" and info.ready
    assert info.weights_sha256 == "random" and info.weights == "random"
    assert info.random_weights is True
    assert list(info.input_size) == [224, 224]
