"""Descriptors over gRPC (issue 4) equal the same recipe computed in-process.

One server holds mobilenet_v2 with its real ImageNet weights (plus a tiny factory net, only so
that a head can be bound to another model) and three heads fitted here with numpy. The test
computes every reference from its own mobilenet_v2 instance (forward hooks, no layertap
extraction code) with the formulas written out below; only R-MAC's region grid is taken from
layertap.server.pooling (tested against cirtorch's formula in tests/test_pooling.py). Inputs are
real photos, mostly sent as raw normalised float32 tensors so preprocessing plays no part; the
region geometry test sends PNG bytes and maps boxes through resize + centre crop by hand.
Requests go through the raw generated stub, independent of the client SDK.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import RunningServer, encode, photo, start_server
from torchvision.ops import roi_align
from torchvision.transforms import v2

from layertap.server.app import create_server
from layertap.server.pooling import pool_maps
from layertap.server.settings import ConfigError, HeadConfig, ModelConfig, Settings, load_settings
from layertap.server.spec import OutputSpec
from layertap.server.worker import Item
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

MODEL = "mobilenet_v2"
DEEP, MID = "features.18", "features.13"  # 1280 x 7 x 7 and 96 x 14 x 14 at 224
DEEP_NODE, MID_NODE = "features.18", "features.13.add"  # what the server resolves them to
D = 1280
K = 32  # components of the fitted head
TOL = 2e-4
PHOTOS = ("astronaut", "chelsea")
Op = pb.PostStep


# --------------------------------------------------------------------------- fixtures
def fit_head(path: Path, dim: int, model: str, seed: int) -> dict[str, np.ndarray]:
    """PCA of a correlated sample with numpy, written in the head file format."""
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((4 * K, dim)) @ rng.standard_normal((dim, dim)) / math.sqrt(dim)
    mean = sample.mean(0)
    _, s, vt = np.linalg.svd(sample - mean, full_matrices=False)
    head = {
        "mean": mean.astype(np.float32),
        "components": vt[:K].astype(np.float32),
        "eigvals": (s[:K] ** 2 / (len(sample) - 1)).astype(np.float32),
    }
    np.savez(
        path,
        format=np.array("layertap-head-v1"),
        model=np.array(model),
        nodes=np.array([DEEP_NODE]),
        pool=np.array("gem"),
        **head,
    )
    return head


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("heads")


@pytest.fixture(scope="module")
def heads(head_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    return {
        "white": fit_head(head_dir / "white.npz", D, MODEL, 0),
        "small": fit_head(head_dir / "small.npz", 64, "", 1),  # the wrong size for DEEP
        "tinyhead": fit_head(head_dir / "tinyhead.npz", 6, "tiny", 2),
    }


@pytest.fixture(scope="module")
def server(head_dir: Path, heads: dict[str, dict[str, np.ndarray]]) -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        max_batch_size=8,
        max_wait_ms=5,
        warmup=False,
        models=(
            ModelConfig(name=MODEL, arch="mobilenet_v2", weights="IMAGENET1K_V1"),
            ModelConfig(
                name="tiny",
                factory="factories:tiny_net",
                kwargs={"width": 6},
                weights="none",
                allow_random=True,
                input_size=(64, 64),
            ),
        ),
        heads=tuple(
            HeadConfig(name, str(head_dir / f"{name}.npz"), model)
            for name, model in (("white", MODEL), ("small", ""), ("tinyhead", "tiny"))
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> pb_grpc.FeatureServiceStub:
    return server.stub()


class Reference:
    """mobilenet_v2 in-process; activations caught by forward hooks on the modules."""

    def __init__(self) -> None:
        weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
        self.preset = preset = weights.transforms()
        # the server's default resize_kernel "uint8" is torchvision v2's uint8 resize
        self.transforms = v2.Compose(
            [
                v2.Resize(preset.resize_size, antialias=True),
                v2.CenterCrop(preset.crop_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(preset.mean, preset.std),
            ]
        )
        self.model = torchvision.models.mobilenet_v2(weights=weights).eval()
        self.caught: dict[str, torch.Tensor] = {}
        for name in (DEEP, MID):
            module = self.model.get_submodule(name)
            module.register_forward_hook(self._catch(name))

    def _catch(self, name: str) -> Any:
        def hook(_module: Any, _args: Any, output: torch.Tensor) -> None:
            self.caught[name] = output.detach().clone()

        return hook

    def maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            self.model(x)
        return dict(self.caught)

    def input(self, name: str) -> torch.Tensor:
        """The photo as the model's normalised [3, 224, 224] input (the preset's steps, v2)."""
        return self.transforms(torch.from_numpy(photo(name)).permute(2, 0, 1))


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def inputs(ref: Reference) -> torch.Tensor:
    return torch.stack([ref.input(n) for n in PHOTOS])


# --------------------------------------------------------------------------- helpers
def tensor_image(x: torch.Tensor, regions: Sequence[Sequence[float]] = ()) -> pb.Image:
    arr = x.numpy().astype("<f4")
    return pb.Image(
        tensor=pb.Tensor(dtype="float32", shape=list(arr.shape), data=arr.tobytes()),
        regions=[pb.Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for b in regions],
    )


def extract(
    stub: pb_grpc.FeatureServiceStub,
    images: list[pb.Image],
    nodes: list[str],
    native: bool = False,
    **output: Any,
) -> pb.ExtractResponse:
    request = pb.ExtractRequest(
        model=MODEL,
        images=images,
        nodes=nodes,
        output=pb.OutputOptions(**output),
        native_resolution=native,
    )
    return stub.Extract(request, timeout=120)


def array(t: pb.Tensor) -> np.ndarray:
    dtype = {"float32": "<f4", "float16": "<f2", "int8": "i1"}[t.dtype]
    return np.frombuffer(t.data, dtype=dtype).reshape(list(t.shape))


def outputs(response: pb.ExtractResponse, key: str) -> np.ndarray:
    """One output key of every image, stacked."""
    rows = []
    for result in response.results:
        (match,) = [o for o in result.outputs if o.key == key]
        rows.append(array(match.tensor))
    return np.stack(rows)


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def gem(m: torch.Tensor, p: float = 3.0) -> np.ndarray:
    return m.clamp(min=1e-6).pow(p).mean((2, 3)).pow(1 / p).numpy()


def pools(m: torch.Tensor) -> dict[str, np.ndarray]:
    """Every global pool of an NCHW batch, written out (R-MAC from pooling: see module doc)."""
    avg, mx = m.mean((2, 3)).numpy(), m.amax((2, 3)).numpy()
    return {
        "avg": avg,
        "max": mx,
        "gem": gem(m),
        "avgmax": (avg + mx) / 2,
        "catavgmax": np.concatenate([avg, mx], axis=1),
        "rmac": pool_maps(m, "NCHW", OutputSpec(pool="rmac"), 0).numpy(),
        "rgem": pool_maps(m, "NCHW", OutputSpec(pool="rgem"), 0).numpy(),
    }


def assert_close(got: np.ndarray, want: np.ndarray, tol: float = TOL) -> None:
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol)


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize(
    "name, enum",
    [
        ("avg", pb.POOLING_AVG),
        ("max", pb.POOLING_MAX),
        ("gem", pb.POOLING_GEM),
        ("avgmax", pb.POOLING_AVGMAX),
        ("catavgmax", pb.POOLING_CATAVGMAX),
        ("rmac", pb.POOLING_RMAC),
        ("rgem", pb.POOLING_RGEM),
    ],
)
def test_every_spatial_pool_matches_in_process(
    stub: pb_grpc.FeatureServiceStub,
    ref: Reference,
    inputs: torch.Tensor,
    name: str,
    enum: int,
) -> None:
    images = [tensor_image(x) for x in inputs]
    got = outputs(extract(stub, images, [DEEP], pool=enum), DEEP)
    want = pools(ref.maps(inputs)[DEEP])[name]
    assert got.shape == (len(PHOTOS), 2 * D if name == "catavgmax" else D)
    assert_close(got, want)
    normalized = outputs(extract(stub, images, [DEEP], pool=enum, normalize=True), DEEP)
    assert_close(normalized, l2(want))


def test_concat_of_two_nodes(
    stub: pb_grpc.FeatureServiceStub, ref: Reference, inputs: torch.Tensor
) -> None:
    images = [tensor_image(x) for x in inputs]
    response = extract(stub, images, [MID, DEEP], pool=pb.POOLING_GEM, concat=True)
    (out,) = response.results[0].outputs
    assert (out.key, out.node) == ("descriptor", f"{MID_NODE}+{DEEP_NODE}")
    assert out.tensor.layout == "NC"
    maps = ref.maps(inputs)
    want = l2(np.concatenate([l2(gem(maps[MID])), l2(gem(maps[DEEP]))], axis=1))
    assert_close(outputs(response, "descriptor"), want)
    keyed = extract(
        stub, images, [MID, DEEP], pool=pb.POOLING_GEM, concat=True, concat_key="g", dtype="int8"
    )
    got8 = outputs(keyed, "g")
    assert got8.dtype == np.int8 and got8.shape == (2, 96 + D)
    assert np.abs(got8.astype(int) - np.round(127 * want)).max() <= 1


def test_post_chain_with_a_registered_head(
    stub: pb_grpc.FeatureServiceStub,
    ref: Reference,
    inputs: torch.Tensor,
    heads: dict[str, dict[str, np.ndarray]],
) -> None:
    head = heads["white"]
    images = [tensor_image(x) for x in inputs]
    x = gem(ref.maps(inputs)[DEEP]).astype(np.float64)
    m, p, lam = (head[k].astype(np.float64) for k in ("mean", "components", "eigvals"))
    power = l2(np.sign(x) * np.abs(x) ** 0.3)
    cases = {
        "center": ([Op(op=Op.OP_CENTER, head="white")], x - m),
        "pca": ([Op(op=Op.OP_PCA, head="white", dim=8)], l2((x - m) @ p[:8].T)),
        "whiten+l2": (
            [
                Op(op=Op.OP_POWER, alpha=0.3),
                Op(op=Op.OP_WHITEN, head="white"),
                Op(op=Op.OP_L2),
            ],
            l2(((power - m) @ p.T) / np.sqrt(lam)),
        ),
        "power default": ([Op(op=Op.OP_POWER)], l2(np.sign(x) * np.abs(x) ** 0.5)),
    }
    for label, (post, want) in cases.items():
        got = outputs(extract(stub, images, [DEEP], pool=pb.POOLING_GEM, post=post), DEEP)
        assert got.shape == want.shape, label
        assert_close(got, want.astype(np.float32), tol=1e-3)
    # int8 after a whitening that ends in L2
    post = [Op(op=Op.OP_WHITEN, head="white", dim=16)]
    got8 = outputs(
        extract(stub, images, [DEEP], pool=pb.POOLING_GEM, post=post, dtype="int8"), DEEP
    )
    want8 = np.round(127 * l2(((x - m) @ p[:16].T) / np.sqrt(lam[:16])))
    assert got8.dtype == np.int8 and np.abs(got8.astype(int) - want8).max() <= 1


def test_tta_flip_and_scales(
    stub: pb_grpc.FeatureServiceStub, ref: Reference, inputs: torch.Tensor
) -> None:
    images = [tensor_image(x) for x in inputs]

    def desc(x: torch.Tensor) -> np.ndarray:
        return l2(gem(ref.maps(x)[DEEP]))

    def scaled(s: float) -> torch.Tensor:
        size = (round(224 * s), round(224 * s))
        return F.interpolate(inputs, size=size, mode="bilinear", antialias=True)

    flipped = extract(
        stub, images, [DEEP], pool=pb.POOLING_GEM, tta=pb.TestTimeAugmentation(flip=True)
    )
    want_flip = (desc(inputs) + desc(torch.flip(inputs, [-1]))) / 2
    assert_close(outputs(flipped, DEEP), want_flip)
    # the flip view rides in its original's batch: 2 images x 2 views in one forward
    assert flipped.metadata.batch_size == 4
    scales = pb.TestTimeAugmentation(scales=[1.0, 0.7071, 0.5], flip=True)
    multi = extract(stub, images, [DEEP], pool=pb.POOLING_GEM, tta=scales, normalize=True)
    views = [v for s in (1.0, 0.7071, 0.5) for v in (scaled(s), torch.flip(scaled(s), [-1]))]
    want = l2(np.mean([desc(v) for v in views], axis=0))
    assert_close(outputs(multi, DEEP), want, tol=1e-3)
    # duplicate scales collapse: the same answer as the flip-only request
    dupes = pb.TestTimeAugmentation(scales=[1.0] * 9, flip=True)
    again = extract(stub, images, [DEEP], pool=pb.POOLING_GEM, tta=dupes)
    assert_close(outputs(again, DEEP), outputs(flipped, DEEP), tol=1e-5)


def roi_ref(m: torch.Tensor, boxes: torch.Tensor, size: int = 7, side: int = 224) -> torch.Tensor:
    """torchvision roi_align of one image's map with boxes in input pixels (side x side)."""
    scale = m.shape[-1] / side
    return roi_align(m, [boxes * scale], output_size=size, sampling_ratio=2, aligned=True)


def test_regions_on_raw_tensor_inputs(
    stub: pb_grpc.FeatureServiceStub, ref: Reference, inputs: torch.Tensor
) -> None:
    boxes = [(0.0, 0.0, 224.0, 224.0), (20.5, 30.0, 120.0, 200.0), (100.0, 0.0, 224.0, 64.0)]
    images = [tensor_image(inputs[0], boxes), tensor_image(inputs[1], boxes[1:2])]
    response = extract(stub, images, [DEEP], pool=pb.POOLING_AVG)
    maps = ref.maps(inputs)[DEEP]
    first = array(response.results[0].outputs[0].tensor)
    second = array(response.results[1].outputs[0].tensor)
    assert first.shape == (3, D) and second.shape == (1, D)
    bins0 = roi_ref(maps[0:1], torch.tensor(boxes))
    assert_close(first, bins0.mean((2, 3)).numpy())
    assert_close(second, roi_ref(maps[1:2], torch.tensor(boxes[1:2])).mean((2, 3)).numpy())
    # a whole-image box is close to the whole map's average (roi_align resamples the 7x7 grid)
    whole = maps[0].mean((1, 2)).numpy()
    cosine = float(first[0] @ whole / np.linalg.norm(first[0]) / np.linalg.norm(whole))
    assert cosine > 0.99
    raw = extract(stub, images[1:], [DEEP], roi_size=3)
    out = raw.results[0].outputs[0].tensor
    assert (list(out.shape), out.layout) == ([1, D, 3, 3], "NCHW")
    assert_close(array(out), roi_ref(maps[1:2], torch.tensor(boxes[1:2]), 3).numpy())
    # regions with flip TTA and int8: boxes mirror with the image
    tta = extract(
        stub,
        images[1:],
        [DEEP],
        pool=pb.POOLING_GEM,
        tta=pb.TestTimeAugmentation(flip=True),
        normalize=True,
        dtype="int8",
    )
    x1, y1, x2, y2 = boxes[1]
    mirrored = torch.tensor([[224 - x2, y1, 224 - x1, y2]])
    flipped_map = ref.maps(torch.flip(inputs[1:2], [-1]))[DEEP]
    views = [
        l2(gem(roi_ref(maps[1:2], torch.tensor(boxes[1:2])))),
        l2(gem(roi_ref(flipped_map, mirrored))),
    ]
    want = np.round(127 * l2(np.mean(views, axis=0)))
    got = array(tta.results[0].outputs[0].tensor)
    assert got.dtype == np.int8 and got.shape == (1, D)
    assert np.abs(got.astype(int) - want).max() <= 1
    # regions with a scale view: boxes scale with the input (one view: no averaging)
    half = extract(
        stub, images[1:], [DEEP], pool=pb.POOLING_AVG, tta=pb.TestTimeAugmentation(scales=[0.5])
    )
    small = F.interpolate(inputs[1:2], size=(112, 112), mode="bilinear", antialias=True)
    bins = roi_ref(ref.maps(small)[DEEP], torch.tensor(boxes[1:2]) * 0.5, side=112)
    assert_close(array(half.results[0].outputs[0].tensor), bins.mean((2, 3)).numpy(), tol=1e-3)


def test_region_boxes_follow_resize_and_centre_crop(
    stub: pb_grpc.FeatureServiceStub, ref: Reference
) -> None:
    """chelsea is 451 x 300: resize to 384 x 256 (shorter side 256), crop 224 at (80, 16)."""
    pixels = photo("chelsea")
    h, w = pixels.shape[:2]
    assert (h, w) == (300, 451)
    box = (150.0, 60.0, 330.0, 250.0)  # original pixels
    image = pb.Image(encoded=encode(pixels, "PNG"), regions=[pb.Box(x1=150, y1=60, x2=330, y2=250)])
    response = extract(stub, [image], [DEEP], pool=pb.POOLING_MAX)
    sx, sy = 384 / 451, 256 / 300  # resized / original, per axis
    left, top = (384 - 224) / 2, (256 - 224) / 2
    mapped = torch.tensor(
        [[box[0] * sx - left, box[1] * sy - top, box[2] * sx - left, box[3] * sy - top]]
    )
    maps = ref.maps(ref.input("chelsea")[None])[DEEP]
    want = roi_ref(maps, mapped).amax((2, 3)).numpy()
    assert_close(outputs(response, DEEP)[0], want, tol=1e-3)
    # native resolution: boxes are used as they are, on the whole image
    native = extract(stub, [image], [DEEP], native=True, pool=pb.POOLING_MAX)
    norm = torchvision.transforms.functional.normalize(
        torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,
        list(ref.preset.mean),
        list(ref.preset.std),
    )
    full = ref.maps(norm[None])[DEEP]
    scale = full.shape[-1] / w, full.shape[-2] / h
    native_box = torch.tensor(
        [[box[0] * scale[0], box[1] * scale[1], box[2] * scale[0], box[3] * scale[1]]]
    )
    want_native = roi_align(full, [native_box], output_size=7, sampling_ratio=2, aligned=True)
    assert_close(outputs(native, DEEP)[0], want_native.amax((2, 3)).numpy(), tol=1e-3)


@pytest.mark.parametrize(
    "h, w, resize, crop",
    [
        (300, 451, 256, (224, 224)),  # landscape: resize, crop the long side
        (451, 300, 256, (224, 224)),  # portrait
        (100, 150, 256, (224, 224)),  # upscaled
        (100, 150, None, (224, 224)),  # no resize, crop bigger than the image: zero padding
        (300, 300, 232, (224, 200)),  # non-square crop
    ],
)
def test_geometry_follows_preprocess(
    h: int, w: int, resize: int | None, crop: tuple[int, int]
) -> None:
    """A bright square's centre lands where Geometry.to_input says, for every path of
    preprocess (resize + crop, upscaling, padding)."""
    from layertap.server.preprocess import Preprocessing, geometry, preprocess

    spec = Preprocessing(resize, crop, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    cy, cx = int(h * 0.45), int(w * 0.55)
    image[:, cy - 4 : cy + 4, cx - 4 : cx + 4] = 255
    out = preprocess(image, spec)[0]
    weight = out.clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(crop[0]), torch.arange(crop[1]), indexing="ij")
    seen_x = float((weight * (xs + 0.5)).sum() / weight.sum())
    seen_y = float((weight * (ys + 0.5)).sum() / weight.sum())
    x, y, _, _ = geometry(h, w, spec).to_input((cx, cy, cx + 1, cy + 1))
    # measured within 0.02 px; a single scale for both axes would be off by ~0.5 px here
    assert abs(x - seen_x) < 0.1 and abs(y - seen_y) < 0.1


# --------------------------------------------------------------------------- server info
def test_server_info_lists_heads_pools_and_int8(
    stub: pb_grpc.FeatureServiceStub, heads: dict[str, dict[str, np.ndarray]]
) -> None:
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    by_name = {h.name: h for h in info.heads}
    assert set(by_name) == {"white", "small", "tinyhead"}
    white = by_name["white"]
    assert (white.model, white.input_dim, white.components) == (MODEL, D, K)
    assert (list(white.nodes), white.pool) == ([DEEP_NODE], "gem")
    assert (by_name["small"].model, by_name["small"].input_dim) == ("", 64)
    assert {"POOLING_RMAC", "POOLING_RGEM", "POOLING_CATAVGMAX", "POOLING_CLS_MEAN"} <= set(
        info.pools
    )
    assert "int8" in info.output_dtypes


# --------------------------------------------------------------------------- validation
BAD_OPTIONS: list[tuple[str, dict[str, Any], list[str], str]] = [
    ("unknown op", {"pool": pb.POOLING_GEM, "post": [Op(op=42)]}, [DEEP], "unknown op 42"),
    (
        "alpha",
        {"pool": pb.POOLING_GEM, "post": [Op(op=Op.OP_POWER, alpha=1.5)]},
        [DEEP],
        "alpha must be in (0, 1]",
    ),
    (
        "alpha negative",
        {"pool": pb.POOLING_GEM, "post": [Op(op=Op.OP_POWER, alpha=-0.5)]},
        [DEEP],
        "alpha must be in (0, 1]",
    ),
    (
        "unknown head",
        {"pool": pb.POOLING_GEM, "post": [Op(op=Op.OP_PCA, head="nope")]},
        [DEEP],
        "registered heads: small, tinyhead, white",
    ),
    (
        "no head",
        {"pool": pb.POOLING_GEM, "post": [Op(op=Op.OP_CENTER)]},
        [DEEP],
        "needs a head name",
    ),
    (
        "other model's head",
        {"pool": pb.POOLING_GEM, "post": [Op(op=Op.OP_PCA, head="tinyhead")]},
        [DEEP],
        "fitted for model 'tiny'",
    ),
    (
        "dim < 0",
        {"pool": pb.POOLING_GEM, "post": [Op(op=Op.OP_PCA, head="white", dim=-1)]},
        [DEEP],
        "dim must be >= 0",
    ),
    (
        "dim > K",
        {"pool": pb.POOLING_GEM, "post": [Op(op=Op.OP_WHITEN, head="white", dim=33)]},
        [DEEP],
        "dim 33 is more than the 32 components of head 'white'",
    ),
    (
        "head size",
        {"pool": pb.POOLING_GEM, "post": [Op(op=Op.OP_PCA, head="small")]},
        [DEEP],
        "takes 64-d descriptors but node 'features.18' pooled with gem gives 1280",
    ),
    (
        "head size after catavgmax",
        {"pool": pb.POOLING_CATAVGMAX, "post": [Op(op=Op.OP_PCA, head="white")]},
        [DEEP],
        "gives 2560",
    ),
    (
        "head size of a concat",
        {"pool": pb.POOLING_GEM, "concat": True, "post": [Op(op=Op.OP_PCA, head="white")]},
        [MID, DEEP],
        "the concatenation of 2 nodes pooled with gem gives 1376",
    ),
    ("concat raw", {"concat": True}, [MID, DEEP], "concat: only for pooled outputs"),
    ("post raw", {"post": [Op(op=Op.OP_L2)]}, [DEEP], "post: only for pooled outputs"),
    (
        "tta raw",
        {"tta": pb.TestTimeAugmentation(flip=True)},
        [DEEP],
        "tta: only for pooled outputs",
    ),
    (
        "concat_key alone",
        {"pool": pb.POOLING_GEM, "concat_key": "x"},
        [DEEP],
        "concat_key is set but concat is not",
    ),
    (
        "scale high",
        {"pool": pb.POOLING_GEM, "tta": pb.TestTimeAugmentation(scales=[1, 5])},
        [DEEP],
        "tta.scales[1] = 5.0 is out of range",
    ),
    (
        "scale nan",
        {"pool": pb.POOLING_GEM, "tta": pb.TestTimeAugmentation(scales=[math.nan])},
        [DEEP],
        "tta.scales[0] = nan is out of range",
    ),
    (
        "too many views",
        {
            "pool": pb.POOLING_GEM,
            "tta": pb.TestTimeAugmentation(scales=[1, 0.9, 0.8, 0.7, 0.6], flip=True),
        },
        [DEEP],
        "10 views",
    ),
    (
        "rmac levels",
        {"pool": pb.POOLING_RMAC, "rmac_levels": 6},
        [DEEP],
        "rmac_levels must be in 1..5",
    ),
    ("roi size", {"pool": pb.POOLING_AVG, "roi_size": 65}, [DEEP], "roi_size must be in 1..64"),
    ("int8 raw", {"dtype": "int8"}, [DEEP], "raw maps"),
    (
        "int8 unnormalised",
        {"pool": pb.POOLING_GEM, "dtype": "int8"},
        [DEEP],
        "not L2-normalised at the end",
    ),
    (
        "int8 after center",
        {"pool": pb.POOLING_GEM, "dtype": "int8", "post": [Op(op=Op.OP_CENTER, head="white")]},
        [DEEP],
        "set normalize=true",
    ),
    (
        "int8 concat then center",
        {
            "pool": pb.POOLING_GEM,
            "dtype": "int8",
            "concat": True,
            "post": [Op(op=Op.OP_CENTER, head="white")],
        },
        [DEEP],
        "not L2-normalised at the end",
    ),
    (
        "int8 tta",
        {"pool": pb.POOLING_GEM, "dtype": "int8", "tta": pb.TestTimeAugmentation(flip=True)},
        [DEEP],
        "int8",
    ),
    ("cls_mean on a map", {"pool": pb.POOLING_CLS_MEAN}, [DEEP], "needs a token output"),
    ("dtype", {"dtype": "int4"}, [DEEP], "'int4' is not supported"),
]


@pytest.mark.parametrize(
    "options, nodes, fragment", [c[1:] for c in BAD_OPTIONS], ids=[c[0] for c in BAD_OPTIONS]
)
def test_bad_output_options_are_invalid_argument(
    stub: pb_grpc.FeatureServiceStub,
    inputs: torch.Tensor,
    options: dict[str, Any],
    nodes: list[str],
    fragment: str,
) -> None:
    err = rpc_error(lambda: extract(stub, [tensor_image(inputs[0])], nodes, **options))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert fragment in err.details()


BAD_REGIONS: list[tuple[str, list[tuple[float, ...]], str]] = [
    ("empty", [(10, 10, 10, 20)], "image 1: regions[0] = (10, 10, 10, 20) is not a box"),
    ("upside down", [(0, 0, 5, 5), (10, 30, 20, 20)], "image 1: regions[1]"),
    ("nan", [(math.nan, 0, 5, 5)], "need finite x1 < x2"),
    ("outside", [(0, 0, 230, 224)], "image 1: regions[0] (0, 0, 230, 224) is outside the image"),
    ("too many", [(0, 0, 5, 5)] * 257, "257 regions, more than 256"),
]


@pytest.mark.parametrize(
    "boxes, fragment", [c[1:] for c in BAD_REGIONS], ids=[c[0] for c in BAD_REGIONS]
)
def test_bad_regions_are_invalid_argument(
    stub: pb_grpc.FeatureServiceStub, inputs: torch.Tensor, boxes: list[Any], fragment: str
) -> None:
    images = [tensor_image(inputs[0]), tensor_image(inputs[1], boxes)]
    err = rpc_error(lambda: extract(stub, images, [DEEP], pool=pb.POOLING_AVG))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert fragment in err.details()


def test_box_outside_the_centre_crop_suggests_native_resolution(
    stub: pb_grpc.FeatureServiceStub,
) -> None:
    image = pb.Image(
        encoded=encode(photo("chelsea"), "PNG"), regions=[pb.Box(x1=0, y1=0, x2=60, y2=90)]
    )
    err = rpc_error(lambda: extract(stub, [image], [DEEP], pool=pb.POOLING_AVG))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0: regions[0]" in err.details() and "centre crop" in err.details()
    assert "native_resolution" in err.details()
    native = extract(stub, [image], [DEEP], native=True, pool=pb.POOLING_AVG)
    assert list(native.results[0].outputs[0].tensor.shape) == [1, D]


def test_regions_need_a_feature_map(stub: pb_grpc.FeatureServiceStub, inputs: torch.Tensor) -> None:
    image = tensor_image(inputs[0], [(0, 0, 100, 100)])
    err = rpc_error(lambda: extract(stub, [image], ["classifier"], pool=pb.POOLING_AVG))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "regions need feature-map nodes" in err.details()


def test_response_estimate_counts_regions_and_dims(server: RunningServer) -> None:
    """Refused before compute: 256 raw 64x64 rois of 1280 channels are ~5 GB."""
    image = tensor_image(torch.zeros(3, 224, 224), [(0, 0, 224, 224)] * 256)
    err = rpc_error(lambda: extract(server.stub(), [image], [DEEP], roi_size=64))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_message_bytes" in err.details()


# --------------------------------------------------------------------------- robustness
def test_a_failing_group_does_not_fail_its_batch_neighbours(
    server: RunningServer, inputs: torch.Tensor
) -> None:
    """Pooling runs per request group after the shared forward: an error in one group becomes
    that group's result, the other requests of the batch still get theirs."""
    good = Item(inputs[0], OutputSpec(pool="avg"), (DEEP_NODE,))
    bad = Item(inputs[1], OutputSpec(pool="cls"), (DEEP_NODE,))  # tokens pool on a map
    runtime = server.server.runtime

    async def run() -> list[Any]:
        return await runtime.run_batch((MODEL, (3, 224, 224)), [good, bad])

    rows = server.call(run())
    assert isinstance(rows[1], Exception) and "token" in str(rows[1])
    assert isinstance(rows[0], dict) and tuple(rows[0][DEEP_NODE].shape) == (D,)


# --------------------------------------------------------------------------- settings
def test_heads_in_toml_are_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    config = tmp_path / "sub" / "layertap.toml"
    config.write_text(
        '[[models]]\nname = "m"\narch = "resnet18"\n\n'
        '[[heads]]\nname = "w"\nfile = "heads/w.npz"\nmodel = "m"\n'
    )
    settings = load_settings(["--config", str(config)], env={})
    assert settings.heads == (HeadConfig("w", str(tmp_path / "sub" / "heads" / "w.npz"), "m"),)
    config.write_text('[[heads]]\nname = "w"\nfile = "w.npz"\nmodel = "other"\n')
    with pytest.raises(ConfigError, match="bound to model 'other', which is not configured"):
        load_settings(["--config", str(config)], env={})
    config.write_text('[[heads]]\nname = "w"\nfile = "w.npz"\nsize = 3\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load_settings(["--config", str(config)], env={})


def test_a_bad_head_file_stops_start_up(tmp_path: Path) -> None:
    broken = tmp_path / "broken.npz"
    np.savez(broken, format=np.array("layertap-head-v1"), mean=np.zeros(4, np.float32))
    for path, message in ((tmp_path / "missing.npz", "file not found"), (broken, "missing key")):
        settings = Settings(port=0, metrics=False, heads=(HeadConfig("h", str(path)),))
        with pytest.raises(ConfigError, match=message):
            asyncio.run(create_server(settings))
