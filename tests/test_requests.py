"""Request validation on its own (server/requests.py, output_options.py, budgets.py): protobuf in,
validated domain objects or a precise error out, with no server, no model and no torch. The
end-to-end tests (test_server_info, reliability/test_bad_inputs) check the same rules over gRPC."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from layertap.server.budgets import (
    MAX_ROI_BINS,
    RESPONSE_HEADROOM,
    check_encoded_sizes,
    estimate_bytes,
    response_size_ok,
)
from layertap.server.errors import (
    ImageLimitExceeded,
    InvalidArgument,
    InvalidImage,
    LimitExceeded,
    ModelNotFound,
    UnknownNode,
)
from layertap.server.output_options import MAX_TTA_VIEWS, descriptor_dims, output_spec
from layertap.server.requests import (
    MAX_COMPARE_NODES,
    MAX_NAMES_CHARS,
    MAX_PARAMETER_NAMES,
    MAX_REGIONS,
    MAX_REQUESTED_NODES,
    compare_nodes,
    compare_pairs,
    extract_job,
    parameter_request,
    plan_outputs,
)
from layertap.server.settings import Settings
from layertap.server.spec import MAX_NAME_CHARS, ImageInput, NodeSpec, OutputSpec, PostOp
from layertap.v1 import layertap_pb2 as pb

MAP = NodeSpec("layer4", (1, 512, 7, 7), "float32", "NCHW", "call_module", "layer4")
TOKENS = NodeSpec("blocks.11", (1, 197, 768), "float32", "NLC", "call_module", "blocks.11")
PATCHES = NodeSpec("patch_embed", (1, 196, 768), "float32", "NLC", "call_module", "patch_embed")
FLAT = NodeSpec("fc", (1, 1000), "float32", "NC", "call_module", "fc")


@dataclass
class FakeCatalog:
    no_prefix: frozenset[str] = frozenset({"patch_embed"})

    def prefix_tokens(self, name: str, n_prefix: int) -> int:
        return 0 if name in self.no_prefix else n_prefix


@dataclass
class FakeConfig:
    compare_nodes: tuple[str, ...] = ()
    submodule: str = ""
    arch: str | None = "resnet50"


@dataclass
class FakeModel:
    config: FakeConfig = field(default_factory=FakeConfig)
    catalog: FakeCatalog = field(default_factory=FakeCatalog)
    n_prefix_tokens: int = 1


class FakeModels:
    """A runtime with one model 'm' whose nodes are MAP, TOKENS, PATCHES and FLAT; 'alias.4'
    resolves to layer4 (as 'layer4.2' would resolve to its last node in a real graph)."""

    def __init__(self, model: FakeModel | None = None) -> None:
        self.loaded = model or FakeModel()
        self.nodes = {n.name: n for n in (MAP, TOKENS, PATCHES, FLAT)} | {"alias.4": MAP}

    def model(self, name: str) -> FakeModel:
        if name != "m":
            raise ModelNotFound(f"model {name!r} is not served")
        return self.loaded

    def resolve(self, name: str, requested: Sequence[str]) -> list[NodeSpec]:
        missing = [n for n in requested if n not in self.nodes]
        if missing:
            raise UnknownNode(f"unknown node {missing[0]!r}")
        return [self.nodes[n] for n in requested]


def _request(nodes: Sequence[str] = ("layer4",), images: int = 1, **output: Any) -> Any:
    return pb.ExtractRequest(
        model="m",
        nodes=list(nodes),
        images=[pb.Image(encoded=b"\xff\xd8jpeg") for _ in range(images)],
        output=pb.OutputOptions(**output),
    )


def _job(request: Any, settings: Settings | None = None, models: Any = None) -> Any:
    return extract_job(request, settings or Settings(), models or FakeModels(), {})


# --------------------------------------------------------------------------- Extract


def test_a_valid_request_becomes_a_job() -> None:
    request = _request(["layer4", "alias.4", "blocks.11"], images=2, pool=pb.POOLING_GEM)
    request.aliases["blocks.11"] = "cls"
    request.priority = pb.PRIORITY_LOW
    job = _job(request)
    assert job.plan == [("layer4", "layer4"), ("alias.4", "alias.4"), ("cls", "blocks.11")]
    assert [n.name for n in job.specs] == ["layer4", "layer4", "blocks.11"]
    assert job.nodes == ("layer4", "blocks.11")  # the worker's node set: each node once
    assert job.spec == OutputSpec(pool="gem")
    assert job.inputs == [ImageInput(encoded=b"\xff\xd8jpeg")] * 2
    assert job.regions == [[], []]
    assert (job.priority, job.concat_key, job.native) == (pb.PRIORITY_LOW, "", False)


def test_checks_run_in_order_model_first() -> None:
    """A request wrong in every way hears about the model first, then the image count, then
    the nodes, then the options."""
    request = _request(["nope"], images=0, dtype="int4")
    request.model = "gone"
    with pytest.raises(ModelNotFound):
        _job(request)
    request.model = "m"
    with pytest.raises(InvalidArgument, match="no images in the request"):
        _job(request)
    request.images.add(encoded=b"x")
    with pytest.raises(UnknownNode, match="'nope'"):
        _job(request)
    request.nodes[:] = ["layer4"]
    with pytest.raises(InvalidArgument, match="output dtype 'int4' is not supported"):
        _job(request)


def test_too_many_images_is_a_limit() -> None:
    with pytest.raises(LimitExceeded, match="3 images in one request exceed max_images_per"):
        _job(_request(images=3), Settings(max_images_per_request=2))


def test_the_output_keys_must_be_unambiguous() -> None:
    assert plan_outputs(["a", "a"], {}) == [("a", "a")]  # the same node twice: once
    with pytest.raises(InvalidArgument, match="output key 'x' is used for both 'a' and 'b'"):
        plan_outputs(["a", "b"], {"a": "x", "b": "x"})
    with pytest.raises(InvalidArgument, match="no nodes requested"):
        plan_outputs([], {})
    with pytest.raises(InvalidArgument, match=f"more than {MAX_REQUESTED_NODES} names"):
        plan_outputs(["a"] * (MAX_REQUESTED_NODES + 1), {})


@pytest.mark.parametrize(
    ("node", "pool", "message"),
    [
        ("blocks.11", pb.POOLING_RMAC, "needs a spatial feature map"),
        ("layer4", pb.POOLING_CLS, "needs a token output"),
        ("patch_embed", pb.POOLING_CLS, "node 'patch_embed' comes before the CLS token"),
    ],
)
def test_a_pool_must_suit_the_node(node: str, pool: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _job(_request([node], pool=pool))


def test_a_model_without_a_cls_token_says_so() -> None:
    models = FakeModels(FakeModel(n_prefix_tokens=0))
    with pytest.raises(InvalidArgument, match="model 'm' has no CLS token; use pool 'mean'"):
        _job(_request(["blocks.11"], pool=pb.POOLING_CLS), models=models)


def test_regions_need_feature_maps_and_boxes() -> None:
    request = _request(["fc"])
    request.images[0].regions.add(x1=0, y1=0, x2=10, y2=10)
    with pytest.raises(InvalidArgument, match="regions need feature-map nodes"):
        _job(request)
    request.nodes[:] = ["layer4"]
    request.images[0].regions.add(x1=5, y1=0, x2=5, y2=10)
    with pytest.raises(InvalidArgument, match=r"image 0: regions\[1\] = \(5, 0, 5, 10\) is not"):
        _job(request)
    del request.images[0].regions[1:]
    for _ in range(MAX_REGIONS):
        request.images[0].regions.add(x1=0, y1=0, x2=1, y2=1)
    with pytest.raises(InvalidArgument, match=f"more than {MAX_REGIONS} per image"):
        _job(request)


def test_roi_bins_are_budgeted_before_compute() -> None:
    """regions x channels x roi_size^2 over MAX_ROI_BINS is refused with the count that fits."""
    request = _request(["layer4"], pool=pb.POOLING_AVG, roi_size=64)
    fit = MAX_ROI_BINS // (512 * 64**2)
    for _ in range(fit + 1):
        request.images[0].regions.add(x1=0, y1=0, x2=8, y2=8)
    with pytest.raises(LimitExceeded, match=f"send at most {fit} regions per image"):
        _job(request)
    del request.images[0].regions[fit:]
    assert len(_job(request).regions[0]) == fit


def test_oversized_encoded_images_are_named() -> None:
    request = _request(images=2)
    request.images[1].encoded = b"x" * 101
    with pytest.raises(ImageLimitExceeded, match="image 1: 101 encoded bytes exceed max_image_b"):
        _job(request, Settings(max_image_bytes=100))

    def label(exc: Any, index: int) -> Any:
        return type(exc)(f"b[{index}]: {exc.reason}")

    with pytest.raises(ImageLimitExceeded, match=r"^b\[0\]: 3 encoded bytes"):
        check_encoded_sizes([ImageInput(encoded=b"abc")], 2, label)


def test_answers_too_large_for_one_message_are_refused_up_front() -> None:
    """Raw layer4 of float32 is 512 x 7 x 7 x 4 bytes per image: over a 64 KiB + 50 KB limit."""
    per_image = 512 * 7 * 7 * 4
    assert estimate_bytes([MAP], OutputSpec(), [], [0, 0]) == 2 * per_image
    small = Settings(max_message_bytes=RESPONSE_HEADROOM + per_image, max_parameter_bytes=1)
    assert _job(_request(["layer4"]), small).nodes == ("layer4",)
    with pytest.raises(LimitExceeded, match="the response would carry about 200704 bytes"):
        _job(_request(["layer4"], images=2), small)
    response_size_ok(per_image, small)
    with pytest.raises(LimitExceeded, match="fewer nodes or fewer images"):
        response_size_ok(per_image + 1, small)


def test_tta_views_are_bounded_and_counted_against_the_queue() -> None:
    tta = pb.TestTimeAugmentation(flip=True, scales=[1, 0.5, 0.75, 1.25, 1.5])
    with pytest.raises(InvalidArgument, match=f"10 views .* at most {MAX_TTA_VIEWS} per image"):
        output_spec(pb.OutputOptions(pool=pb.POOLING_GEM, tta=tta))
    request = _request(images=3, pool=pb.POOLING_GEM, tta=pb.TestTimeAugmentation(flip=True))
    with pytest.raises(LimitExceeded, match="3 images x 2 TTA views are 6 forward inputs"):
        _job(request, Settings(max_queue_images=5))


def test_unknown_priority() -> None:
    request = _request()
    request.priority = 7  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match="unknown priority 7"):
        _job(request)


# --------------------------------------------------------------------------- output options


def test_output_options_become_a_spec() -> None:
    options = pb.OutputOptions(
        pool=pb.POOLING_CATAVGMAX,
        post=[pb.PostStep(op=pb.PostStep.OP_POWER, alpha=0.25), pb.PostStep(op=pb.PostStep.OP_L2)],
        concat=True,
        tta=pb.TestTimeAugmentation(scales=[1, 0.5, 1]),
    )
    spec = output_spec(options)
    assert spec.pool == "catavgmax" and spec.concat
    assert spec.post == (PostOp("power", 0.25), PostOp("l2"))
    assert spec.scales == (1.0, 0.5)  # duplicates collapse
    assert descriptor_dims([MAP, FLAT], spec, {}) == [2 * 512 + 2 * 1000]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (pb.OutputOptions(pool=99), "unknown pool value 99"),
        (pb.OutputOptions(pool=pb.POOLING_GEM, gem_p=200), r"gem_p must be .* \[0.1, 100\]"),
        (pb.OutputOptions(pool=pb.POOLING_RMAC, rmac_levels=9), "rmac_levels must be in 1..5"),
        (pb.OutputOptions(roi_size=65), "roi_size must be in 1..64"),
        (pb.OutputOptions(concat=True), "concat: only for pooled outputs"),
        (pb.OutputOptions(pool=pb.POOLING_AVG, dtype="int8"), "not L2-normalised at the end"),
        (pb.OutputOptions(concat_key="d", pool=pb.POOLING_AVG), "concat_key is set but concat"),
        (
            pb.OutputOptions(pool=pb.POOLING_AVG, post=[pb.PostStep(op=pb.PostStep.OP_PCA)]),
            r"post\[0\] \(OP_PCA\) needs a head name; registered heads: none",
        ),
        (
            pb.OutputOptions(pool=pb.POOLING_AVG, post=[pb.PostStep(op=pb.PostStep.OP_L2, dim=3)]),
            "head and dim are for OP_CENTER/OP_PCA/OP_WHITEN only",
        ),
    ],
)
def test_bad_output_options_say_what_to_change(options: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        output_spec(options)


# --------------------------------------------------------------------------- Compare, parameters


def test_compare_pairs_and_nodes() -> None:
    request = pb.CompareRequest(model="m", a=[pb.Image(encoded=b"a")] * 3, b=[pb.Image()] * 2)
    with pytest.raises(InvalidArgument, match="a has 3 images and b has 2"):
        compare_pairs(Settings(), request)
    del request.a[2]
    with pytest.raises(LimitExceeded, match="send at most 1 pairs per request"):
        compare_pairs(Settings(max_images_per_request=3), request)
    assert compare_pairs(Settings(), request) == 2
    with pytest.raises(InvalidArgument, match="model 'm' has no default compare nodes"):
        compare_nodes(FakeModels(), request)
    vgg = FakeModels(FakeModel(config=FakeConfig(arch="vgg16")))
    with pytest.raises(InvalidArgument, match=r"unknown node 'features\.3'"):  # vgg16's LPIPS taps
        compare_nodes(vgg, request)
    request.nodes[:] = ["layer4", "alias.4"]
    with pytest.raises(InvalidArgument, match="are the same node 'layer4'; list each node once"):
        compare_nodes(FakeModels(), request)
    request.nodes[:] = ["fc"]
    with pytest.raises(InvalidArgument, match="Compare needs feature maps"):
        compare_nodes(FakeModels(), request)
    request.nodes[:] = ["layer4", "blocks.11"]
    assert compare_nodes(FakeModels(), request) == (["layer4", "blocks.11"], [MAP, TOKENS])


def test_parameter_requests() -> None:
    assert parameter_request(pb.GetParametersRequest(names=["fc.weight"])) == (
        ["fc.weight"],
        "float32",
    )
    with pytest.raises(InvalidArgument, match="no names"):
        parameter_request(pb.GetParametersRequest())
    with pytest.raises(InvalidArgument, match=r"names\[1\] is empty"):
        parameter_request(pb.GetParametersRequest(names=["fc.weight", ""]))
    with pytest.raises(InvalidArgument, match="dtype 'int8' is not supported"):
        parameter_request(pb.GetParametersRequest(names=["fc.weight"], dtype="int8"))


def test_an_image_without_a_source() -> None:
    request = _request(images=2)
    request.images[1].Clear()
    with pytest.raises(InvalidImage, match="image 1: neither 'encoded' bytes nor a 'tensor'"):
        _job(request)


# --------------------------------------------------------------------------- name lengths


def test_names_are_bounded_before_any_lookup() -> None:
    """Every name is length-checked before it is hashed, resolved or quoted: a 60 MB node
    name once spent ~8 s in 'closest names' on the event loop."""
    long = "x" * (MAX_NAME_CHARS + 1)
    with pytest.raises(InvalidArgument, match=f"nodes\\[1\\] .* is {MAX_NAME_CHARS + 1} char"):
        _job(_request(["layer4", long]))
    request = _request(["layer4"])
    request.aliases[long] = "k"
    with pytest.raises(InvalidArgument, match=r"aliases \(node\)\[0\]"):
        _job(request)
    request = _request(["layer4"])
    request.aliases["layer4"] = long
    with pytest.raises(InvalidArgument, match=r"aliases \(key\)\[0\]"):
        _job(request)
    many = [
        f"n{i:04d}" + "y" * (MAX_NAME_CHARS - 5)
        for i in range(MAX_NAMES_CHARS // MAX_NAME_CHARS + 1)
    ]
    with pytest.raises(InvalidArgument, match=f"more than the {MAX_NAMES_CHARS} one request"):
        plan_outputs(many, {})
    with pytest.raises(InvalidArgument, match=r"concat_key .* characters long"):
        _job(_request(pool=pb.POOLING_GEM, concat=True, concat_key=long))
    step = pb.PostStep(op=pb.PostStep.OP_PCA, head=long)
    with pytest.raises(InvalidArgument, match=r"post\[0\] \(OP_PCA\): head .* characters long"):
        output_spec(pb.OutputOptions(pool=pb.POOLING_GEM, post=[step]))
    with pytest.raises(InvalidArgument, match=r"output dtype 'x{40}' is not supported"):
        _job(_request(dtype=long))
    request = _request()
    request.images[0].tensor.dtype = long
    with pytest.raises(InvalidImage, match=r"image 0: tensor\.dtype is 513 characters long"):
        _job(request)
    request.images[0].tensor.dtype = "float32"
    request.images[0].tensor.shape[:] = [1] * 5
    with pytest.raises(InvalidImage, match=r"image 0: tensor\.shape has 5 dimensions"):
        _job(request)


def test_compare_and_parameter_names_are_bounded() -> None:
    long = "x" * (MAX_NAME_CHARS + 1)
    request = pb.CompareRequest(model="m", nodes=["layer4", long])
    with pytest.raises(InvalidArgument, match=r"nodes\[1\] .* characters long"):
        compare_nodes(FakeModels(), request)
    request.nodes[:] = ["layer4"] * (MAX_COMPARE_NODES + 1)
    with pytest.raises(InvalidArgument, match=f"{MAX_COMPARE_NODES + 1} nodes, more than"):
        compare_nodes(FakeModels(), request)
    with pytest.raises(InvalidArgument, match=r"names\[0\] .* characters long"):
        parameter_request(pb.GetParametersRequest(names=[long]))
    names = ["fc.weight"] * (MAX_PARAMETER_NAMES + 1)
    with pytest.raises(InvalidArgument, match=f"{MAX_PARAMETER_NAMES + 1} names, more than"):
        parameter_request(pb.GetParametersRequest(names=names))
    with pytest.raises(InvalidArgument, match=r"dtype 'x{40}' is not supported"):
        parameter_request(pb.GetParametersRequest(names=["fc.weight"], dtype=long))
