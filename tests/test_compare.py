"""The Compare RPC: perceptual (LPIPS-style) and Gram style distances of image pairs.

Served distances are checked against an in-process computation that shares nothing with the
server's code: the test's own torchvision model (create_feature_extractor, or forward hooks),
fed the same already-normalised float32 tensors, and the formulas written out here. VGG16 runs
with random weights at 64x64 (no VGG weights offline; production would use the ImageNet
weights); the perceptual checks on real photos use mobilenet_v2 with its real weights.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import factories
import grpc
import numpy as np
import pytest
import torch
import torchvision
from conftest import RunningServer, encode, photo, start_server
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor

from layertap.client import AsyncFeatureClient, FeatureClient, FeatureServiceError
from layertap.client.cli import main
from layertap.server.distances import gram, layer_distance, positions, style_distance
from layertap.server.requests import VGG16_NODES
from layertap.server.settings import ModelConfig, Settings, load_settings, parse_model
from layertap.v1 import layertap_pb2 as pb

MiB = 1024 * 1024
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
MOBILE_NODES = ("features.3", "features.6", "features.13")
DEFAULT_MOBILENET = next(m for m in load_settings([], env={}).models if m.name == "mobilenet_v2")
assert DEFAULT_MOBILENET.compare_nodes == MOBILE_NODES
VGG_SIZE = 64


# --- the formulas, written out independently ---------------------------------------------------
def ref_layer(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """fa, fb: [C, H, W] float32. LPIPS without weights: x / (||x||_C + 1e-10)."""
    na = fa / (fa.pow(2).sum(0, keepdim=True).sqrt() + 1e-10)
    nb = fb / (fb.pow(2).sum(0, keepdim=True).sqrt() + 1e-10)
    return float((na - nb).pow(2).sum(0).mean())


def ref_style(fa: torch.Tensor, fb: torch.Tensor) -> float:
    c, h, w = fa.shape
    ga = fa.reshape(c, h * w) @ fa.reshape(c, h * w).T / (c * h * w)
    gb = fb.reshape(c, h * w) @ fb.reshape(c, h * w).T / (c * h * w)
    return float((ga - gb).pow(2).sum())


def test_formulas_on_small_tensors() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    fa, fb = positions(x, "NCHW"), positions(y, "NCHW")
    assert layer_distance(fa, fb) == pytest.approx(ref_layer(x, y), rel=1e-6)
    assert style_distance(fa, fb) == pytest.approx(ref_style(x, y), rel=1e-6)
    assert layer_distance(fa, fa) == 0.0 and style_distance(fa, fa) == 0.0
    # scale invariance per position: only directions count for the perceptual term
    scale = torch.rand(1, 3, 4) + 0.5
    assert layer_distance(positions(x * scale, "NCHW"), fa) == pytest.approx(0, abs=1e-12)
    # a hand-computed case: C=2, one position, orthogonal unit vectors -> |e1 - e2|^2 = 2
    e1, e2 = torch.tensor([[[3.0]], [[0.0]]]), torch.tensor([[[0.0]], [[5.0]]])
    assert layer_distance(positions(e1, "NCHW"), positions(e2, "NCHW")) == pytest.approx(2.0)
    g = gram(positions(e1, "NCHW"))
    assert g.tolist() == [[4.5, 0.0], [0.0, 0.0]]  # F Fᵀ / (C·H·W) = [[9, 0], [0, 0]] / 2
    # NHWC and NLC layouts see the same positions as NCHW
    nhwc = positions(x.permute(1, 2, 0), "NHWC")
    assert torch.equal(nhwc, fa)
    tokens = torch.cat([torch.randn(1, 5), x.flatten(1).T])  # a CLS token, then 12 positions
    assert torch.equal(positions(tokens, "NLC", n_prefix=1), fa)


# --- servers and reference models ---------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        max_batch_size=8,
        max_wait_ms=5,
        max_images_per_request=8,
        max_message_bytes=128 * MiB,
        max_parameter_bytes=100 * MiB,
        log_level="ERROR",
        models=(
            # the embedded default config's entry: its compare_nodes are what these tests pin
            DEFAULT_MOBILENET,
            # random init: no VGG weights offline (production serves IMAGENET1K_V1)
            ModelConfig(
                name="vgg16",
                arch="vgg16",
                weights="none",
                allow_random=True,
                input_size=(VGG_SIZE, VGG_SIZE),
                resize_size=VGG_SIZE,
            ),
            ModelConfig(
                name="tiny",
                factory="factories:tiny_net",
                kwargs={"width": 4},
                weights="none",
                allow_random=True,
                input_size=(32, 32),
            ),
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[FeatureClient]:
    with FeatureClient(server.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def jpeg() -> dict[str, bytes]:
    out = {name: encode(photo(name), quality=95) for name in ("astronaut", "chelsea", "coffee")}
    out["astronaut_q30"] = encode(photo("astronaut"), quality=30)
    out["chelsea_q30"] = encode(photo("chelsea"), quality=30)
    return out


def normalised(name: str, size: int) -> np.ndarray:
    """A photo resized to size x size and ImageNet-normalised: float32 [3, size, size]."""
    image = Image.fromarray(photo(name)).resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return ((x - MEAN) / STD).astype(np.float32)


def as_image(x: np.ndarray) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(dtype="float32", shape=[1, *x.shape], data=x.tobytes()))


def reference_features(
    model: torch.nn.Module, nodes: tuple[str, ...], x: np.ndarray
) -> dict[str, torch.Tensor]:
    """The nodes' outputs for one image [3, H, W] by forward hooks (outputs cloned)."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out[0].clone())
        )
        for name in nodes
    ]
    with torch.no_grad():
        model(torch.from_numpy(x)[None])
    for h in handles:
        h.remove()
    return seen


def check_pair(
    pair: pb.PairDistance, fa: dict[str, torch.Tensor], fb: dict[str, torch.Tensor], nodes: tuple
) -> None:
    layers = [ref_layer(fa[n], fb[n]) for n in nodes]
    styles = [ref_style(fa[n], fb[n]) for n in nodes]
    assert list(pair.layer_distances) == pytest.approx(layers, rel=1e-3, abs=1e-6)
    assert list(pair.style_layer_distances) == pytest.approx(styles, rel=1e-3, abs=1e-9)
    assert pair.distance == pytest.approx(sum(pair.layer_distances), rel=1e-5)
    assert pair.style_distance == pytest.approx(sum(pair.style_layer_distances), rel=1e-5)


# --- served distances equal the in-process computation ------------------------------------------
def test_vgg16_default_nodes_match_in_process(server: RunningServer, client: FeatureClient) -> None:
    names = ("astronaut", "chelsea", "coffee")
    xs = {n: normalised(n, VGG_SIZE) for n in names}
    request = pb.CompareRequest(
        model="vgg16",  # no nodes: VGG16's relu1_2 .. relu5_3
        a=[as_image(xs["astronaut"]), as_image(xs["coffee"])],
        b=[as_image(xs["chelsea"]), as_image(xs["astronaut"])],
        style=True,
    )
    response = server.stub().Compare(request, timeout=120)
    assert [n.node for n in response.nodes] == list(VGG16_NODES)
    assert response.model == "vgg16" and len(response.pairs) == 2

    # the same random weights in the test's own vgg16 (through GetParameters), and
    # torchvision's create_feature_extractor as the reference extractor
    model = torchvision.models.vgg16(weights=None).eval()
    convs = [
        f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, torch.nn.Conv2d)
    ]
    params = client.get_parameters("vgg16", convs)
    missing = model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, False)
    assert not missing.unexpected_keys
    assert not [k for k in missing.missing_keys if k.startswith("features.")]
    extractor = create_feature_extractor(model, list(VGG16_NODES)).eval()
    with torch.no_grad():
        feats = {
            n: {k: v[0] for k, v in extractor(torch.from_numpy(xs[n])[None]).items()} for n in names
        }
    check_pair(response.pairs[0], feats["astronaut"], feats["chelsea"], VGG16_NODES)
    check_pair(response.pairs[1], feats["coffee"], feats["astronaut"], VGG16_NODES)


def test_mobilenet_compare_nodes_match_in_process(server: RunningServer) -> None:
    x, y = normalised("chelsea", 224), normalised("coffee", 224)
    request = pb.CompareRequest(model="mobilenet_v2", a=[as_image(x)], b=[as_image(y)], style=True)
    response = server.stub().Compare(request, timeout=120)
    assert [n.requested for n in response.nodes] == list(MOBILE_NODES)
    assert [n.node for n in response.nodes] == [f"{n}.add" for n in MOBILE_NODES]
    assert response.weights_sha256 not in ("", "random")
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    check_pair(
        response.pairs[0],
        reference_features(model, MOBILE_NODES, x),
        reference_features(model, MOBILE_NODES, y),
        MOBILE_NODES,
    )


# --- perceptual properties on real photos -------------------------------------------------------
def test_identity_symmetry_and_jpeg_copy_is_closer(
    client: FeatureClient, jpeg: dict[str, bytes]
) -> None:
    a = [jpeg["astronaut"], jpeg["chelsea"], jpeg["astronaut"], jpeg["astronaut"]]
    b = [jpeg["astronaut"], jpeg["chelsea"], jpeg["astronaut_q30"], jpeg["coffee"]]
    r = client.compare(a, b, model="mobilenet_v2", style=True)
    assert [n.node for n in r.nodes] == [f"{n}.add" for n in MOBILE_NODES]
    d = r.distances
    assert d[0] == pytest.approx(0, abs=1e-6) and d[1] == pytest.approx(0, abs=1e-6)
    assert r.style_distances[0] == pytest.approx(0, abs=1e-6)
    assert 0 < d[2] < d[3], d  # the q30 recompressed copy is closer than another photo
    for pair in r.pairs:
        assert list(pair.layers) == list(MOBILE_NODES)
        assert all(v >= 0 for v in pair.style_layers.values())
        assert pair.distance == pytest.approx(sum(pair.layers.values()), rel=1e-5)

    swapped = client.compare(b[2:], a[2:], model="mobilenet_v2", style=True)
    np.testing.assert_allclose(swapped.distances, d[2:], rtol=1e-5)
    np.testing.assert_allclose(swapped.style_distances, r.style_distances[2:], rtol=1e-5)

    # a copy of the cat: closer than the astronaut or the coffee, on the chosen nodes too
    cat = client.compare(
        [jpeg["chelsea"]] * 3,
        [jpeg["chelsea_q30"], jpeg["astronaut"], jpeg["coffee"]],
        model="mobilenet_v2",
        nodes=["features.6", "features.13"],
    )
    assert [n.key for n in cat.nodes] == ["features.6", "features.13"]
    assert cat.distances[0] < min(cat.distances[1:]), cat.distances
    assert all(p.style_layers == {} and p.style_distance == 0 for p in cat.pairs)


def test_native_resolution_pairs_and_async_client(server: RunningServer) -> None:
    small = encode(np.asarray(Image.fromarray(photo("coffee")).resize((96, 64))))
    small_q = encode(np.asarray(Image.fromarray(photo("coffee")).resize((96, 64))), quality=30)
    other = encode(np.asarray(Image.fromarray(photo("chelsea")).resize((96, 64))))

    async def run() -> list[float]:
        async with AsyncFeatureClient(server.target, timeout=120) as c:
            r = await c.compare(
                [small, small],
                [small_q, other],
                model="tiny",
                nodes="pools",
                native_resolution=True,
            )
            return [float(x) for x in r.distances]

    near, far = asyncio.run(run())
    assert 0 < near < far


def _noisy(name: str, sigma: float) -> bytes:
    """The photo with seeded Gaussian noise of `sigma` grey levels, as a JPEG."""
    rng = np.random.default_rng(int(sigma))
    noisy = photo(name).astype(np.float64) + rng.normal(0, sigma, photo(name).shape)
    return encode(np.clip(noisy, 0, 255).astype(np.uint8), quality=95)


def _np_layer(fa: np.ndarray, fb: np.ndarray) -> float:
    """ref_layer in numpy, in float64, on [C, H, W] maps."""
    fa, fb = fa.astype(np.float64), fb.astype(np.float64)
    na = fa / (np.sqrt((fa**2).sum(0, keepdims=True)) + 1e-10)
    nb = fb / (np.sqrt((fb**2).sum(0, keepdims=True)) + 1e-10)
    return float(((na - nb) ** 2).sum(0).mean())


def _np_style(fa: np.ndarray, fb: np.ndarray) -> float:
    """ref_style in numpy, in float64."""
    c = fa.shape[0]
    xa, xb = fa.reshape(c, -1).astype(np.float64), fb.reshape(c, -1).astype(np.float64)
    ga, gb = xa @ xa.T / xa.size, xb @ xb.T / xb.size
    return float(((ga - gb) ** 2).sum())


def test_pairs_past_the_limit_are_split_by_the_client(
    client: FeatureClient, jpeg: dict[str, bytes]
) -> None:
    # 5 pairs = 10 images > max_images_per_request=8: two calls, answers in order
    same = [jpeg["astronaut"], jpeg["chelsea"], jpeg["coffee"], jpeg["astronaut"], jpeg["chelsea"]]
    r = client.compare(same, same, model="tiny", nodes=["stem"])
    assert len(r) == 5 and np.all(np.abs(r.distances) <= 1e-6)

    # each pair is a photo and a noisy copy of it, the noise level differing from pair to pair
    # (not in order): every pair has its own distance, so a reordered, dropped or repeated
    # pair in the client's reassembly shows
    photos = ("astronaut", "chelsea", "coffee", "astronaut", "chelsea")
    sigmas = (80.0, 3.0, 200.0, 8.0, 13.0)  # distances ~2.7, 0.12, 4.9, 0.22, 1.0
    a = [jpeg[name] for name in photos]
    b = [_noisy(name, sigma) for name, sigma in zip(photos, sigmas, strict=True)]
    r = client.compare(a, b, model="mobilenet_v2", style=True)
    keys = [n.key for n in r.nodes]
    assert keys == list(MOBILE_NODES)
    # the reference: the same nodes' maps through Extract (one image per call), the formulas
    # in numpy
    resolved = [n.node for n in r.nodes]

    def maps(image: bytes) -> list[np.ndarray]:
        out = client.extract(image, model="mobilenet_v2", nodes=resolved)
        return [out[node][0] for node in resolved]

    layers, styles = [], []
    for x, y in zip(a, b, strict=True):
        fa, fb = maps(x), maps(y)
        layers.append([_np_layer(u, v) for u, v in zip(fa, fb, strict=True)])
        styles.append([_np_style(u, v) for u, v in zip(fa, fb, strict=True)])
    totals = np.array([sum(row) for row in layers])
    ordered = np.sort(totals)
    assert np.all(ordered[1:] > 1.3 * ordered[:-1]), totals  # every pair's distance is its own
    assert len(r) == 5 and len(r.pairs) == 5
    np.testing.assert_allclose(r.distances, totals, rtol=1e-4)
    np.testing.assert_allclose(r.style_distances, [sum(row) for row in styles], rtol=1e-3)
    for pair, layer, style in zip(r.pairs, layers, styles, strict=True):
        np.testing.assert_allclose([pair.layers[k] for k in keys], layer, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(
            [pair.style_layers[k] for k in keys], style, rtol=1e-3, atol=1e-9
        )


# --- errors --------------------------------------------------------------------------------------
def _error(server: RunningServer, request: pb.CompareRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        server.stub().Compare(request, timeout=60)
    return info.value


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "not served here"),
        ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model is empty"),
        ({"b": []}, grpc.StatusCode.INVALID_ARGUMENT, "a has 1 images and b has 0"),
        ({"a": [], "b": []}, grpc.StatusCode.INVALID_ARGUMENT, "no pairs"),
        ({"a": "5x", "b": "5x"}, grpc.StatusCode.RESOURCE_EXHAUSTED, "10 images, over max_images"),
        ({"b": "bad"}, grpc.StatusCode.INVALID_ARGUMENT, "b[0]: "),
        ({"a": "empty"}, grpc.StatusCode.INVALID_ARGUMENT, "a[0]: neither 'encoded'"),
        ({"model": "tiny", "nodes": []}, grpc.StatusCode.INVALID_ARGUMENT, "compare_nodes"),
        ({"nodes": ["classifier.1"]}, grpc.StatusCode.INVALID_ARGUMENT, "needs feature maps"),
        ({"nodes": ["features.99"]}, grpc.StatusCode.INVALID_ARGUMENT, "features.99"),
        ({"nodes": ["features.3", ""]}, grpc.StatusCode.INVALID_ARGUMENT, "nodes[1] is empty"),
        (
            {"nodes": ["features.3", "features.3.add"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "are the same node",
        ),
        ({"native": True}, grpc.StatusCode.INVALID_ARGUMENT, "pair 0: a[0] is 64x96 and b[0]"),
        ({"tensors": True}, grpc.StatusCode.INVALID_ARGUMENT, "pair 0: a[0] is 224x224"),
    ],
)
def test_errors(
    server: RunningServer,
    jpeg: dict[str, bytes],
    fields: dict[str, object],
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    good = pb.Image(encoded=jpeg["chelsea"])
    images = {
        "5x": [good] * 5,
        "bad": [pb.Image(encoded=b"\xff\xd8 not a jpeg")],
        "empty": [pb.Image()],
    }
    request = pb.CompareRequest(model=str(fields.get("model", "mobilenet_v2")), a=[good], b=[good])
    for side in ("a", "b"):
        if side in fields:
            value = fields[side]
            del getattr(request, side)[:]
            getattr(request, side).extend(images[value] if isinstance(value, str) else value)
    request.nodes.extend(fields.get("nodes", []))  # type: ignore[arg-type]
    if fields.get("native"):
        a = encode(np.asarray(Image.fromarray(photo("coffee")).resize((96, 64))))
        b = encode(np.asarray(Image.fromarray(photo("coffee")).resize((80, 64))))
        request = pb.CompareRequest(
            model="mobilenet_v2", a=[pb.Image(encoded=a)], b=[pb.Image(encoded=b)]
        )
        request.native_resolution = True
    if fields.get("tensors"):
        request = pb.CompareRequest(
            model="mobilenet_v2",
            a=[as_image(normalised("coffee", 224))],
            b=[as_image(normalised("coffee", 160))],
        )
    err = _error(server, request)
    assert err.code() == code, err.details()
    assert fragment in (err.details() or ""), err.details()


def test_compare_nodes_config_is_parsed() -> None:
    cfg = parse_model({"name": "m", "arch": "mobilenet_v2", "compare_nodes": ["features.3"]})
    assert cfg.compare_nodes == ("features.3",)
    with pytest.raises(ValueError, match="compare_nodes must be a list"):
        parse_model({"name": "m", "arch": "mobilenet_v2", "compare_nodes": "features.3"})


def test_client_refuses_unequal_lists_before_any_call(client: FeatureClient) -> None:
    with pytest.raises(ValueError, match="same length"):
        client.compare([b"x", b"y"], [b"x"], model="vgg16")
    with pytest.raises(FeatureServiceError) as info:
        client.compare(b"not an image", b"not an image", model="tiny", nodes="stem")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


# --- CLI -----------------------------------------------------------------------------------------
def test_cli_prints_distances(
    server: RunningServer,
    jpeg: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = {}
    for name in ("astronaut", "astronaut_q30", "coffee"):
        files[name] = tmp_path / f"{name}.jpg"
        files[name].write_bytes(jpeg[name])
    args = ["--target", server.target, "compare", "--model", "mobilenet_v2", "--style"]
    paths = [str(files[n]) for n in ("astronaut", "astronaut_q30", "astronaut", "coffee")]
    assert main([*args, *paths, "--layers"]) == 0
    out = capsys.readouterr().out.splitlines()
    pair_lines = [line for line in out if "distance=" in line]
    assert len(pair_lines) == 2 and "style=" in pair_lines[0]
    near, far = (float(line.split("distance=")[1].split()[0]) for line in pair_lines)
    assert 0 < near < far
    assert sum("features.13:" in line for line in out) == 2
    assert main([*args, "--json", "-n", "features.6,features.13", *paths[:2]]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["a"].endswith("astronaut.jpg") and row["distance"] > 0 and "style_distance" in row
    assert main([*args, paths[0]]) == 2
    assert "pairs" in capsys.readouterr().err


# --- batching with other traffic, and leaving with the client ----------------------------------
def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def _marked(value: float, seed: int) -> pb.Image:
    """A random [1, 3, 16, 16] input whose maximum (what the probe records) is `value`."""
    x = np.random.default_rng(seed).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    x.flat[0] = value
    return as_image(x[0])


def test_compare_batches_with_extract_and_leaves_with_its_client() -> None:
    name = "cmp-probe"
    probe = ModelConfig(
        name=name,
        factory="factories:probe_net",
        kwargs={"tag": name},
        weights="none",
        allow_random=True,
        input_size=(16, 16),
        leaf_modules=("factories:Probe",),
    )
    running = start_server(Settings(port=0, metrics=False, max_wait_ms=50, models=(probe,)))

    def seen() -> list[float]:
        return [m for e in factories.probe_log(name) for m in e["max"]]  # type: ignore[attr-defined]

    def extract(value: float, seed: int) -> pb.ExtractRequest:
        return pb.ExtractRequest(model=name, images=[_marked(value, seed)], nodes=["relu"])

    hold = factories.hold_probe(name)  # type: ignore[attr-defined]
    try:
        stub = running.stub()
        blocker = stub.Extract.future(extract(11.0, 0), timeout=30)
        _until(lambda: 11.0 in seen(), "the blocker to start")
        pair = pb.CompareRequest(model=name, a=[_marked(21.0, 1)], b=[_marked(22.0, 2)])
        pair.nodes.append("relu")
        compared = stub.Compare.future(pair, timeout=30)
        extracted = stub.Extract.future(extract(23.0, 3), timeout=30)
        _until(lambda: running.server.batcher.queued == 3, "three queued images")
        hold.set()
        blocker.result(30)
        assert compared.result(30).pairs[0].distance > 0
        assert extracted.result(30).metadata.batch_size == 3  # one forward for all three
        batch = next(e for e in factories.probe_log(name) if 23.0 in e["max"])  # type: ignore[operator]
        assert sorted(batch["max"]) == [21.0, 22.0, 23.0]  # type: ignore[call-overload]

        hold = factories.hold_probe(name)  # type: ignore[attr-defined]
        blocker = stub.Extract.future(extract(12.0, 4), timeout=30)
        _until(lambda: 12.0 in seen(), "the second blocker to start")
        gone = pb.CompareRequest(model=name, a=[_marked(31.0, 5)], b=[_marked(32.0, 6)])
        gone.nodes.append("relu")
        call = stub.Compare.future(gone, timeout=30)
        _until(lambda: running.server.batcher.queued == 2, "the pair to queue")
        call.cancel()
        _until(lambda: running.server.batcher.dropped.get("cancelled") == 2, "the pair's drop")
        hold.set()
        blocker.result(30)
        same = pb.CompareRequest(model=name, a=[_marked(41.0, 7)], b=[_marked(41.0, 7)])
        same.nodes.append("relu")
        assert stub.Compare(same, timeout=30).pairs[0].distance == pytest.approx(0, abs=1e-6)
    finally:
        hold.set()
        running.stop()
    assert 31.0 not in seen() and 32.0 not in seen(), "a cancelled pair was computed"
