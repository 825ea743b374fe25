"""The per-model extractor cache (server/extractors.py, cached_extractor) past its size.

With extractor_cache_size = 2 and more node sets than that, the least used extractor leaves
(the least recent among equals), the evictions metric counts each one, and a node set whose
extractor left is rebuilt on its next request and returns the very values it returned before:
for a warmed-up extractor of a BatchNorm-folding resnet18, and for a torch.compile'd one (eager
backend: the compile path without a C++ compiler's minutes). Each is also compared with an
independent reference computed here from the same weights. A client cycling through more node
sets than the cache holds does not evict the hot one (frequency, not recency, decides).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import factories
import numpy as np
import pytest
import torch
import torchvision
from conftest import RunningServer, start_server

from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

SIZE = 32
CACHE = 2
EVICTIONS = "layertap_extractor_cache_evictions_total"
MISSES = "layertap_extractor_cache_misses_total"
HITS = "layertap_extractor_cache_hits_total"
ENTRIES = "layertap_extractor_cache_entries"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pth"
    torch.save(factories.tiny_net(width=4).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def server(resnet18_weights: Path, tiny_weights: Path) -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        extractor_cache_size=CACHE,
        warmup=True,
        models=(
            ModelConfig(
                name="r18",
                arch="resnet18",
                weights=str(resnet18_weights),
                input_size=(SIZE, SIZE),
                warmup_nodes=(("layer1",),),
            ),
            ModelConfig(
                name="compiled",
                factory="factories:tiny_net",
                kwargs={"width": 4},
                weights=str(tiny_weights),
                input_size=(SIZE, SIZE),
                compile="default",
                compile_backend="eager",
            ),
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


def _input(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)


def _extract(server: RunningServer, model: str, x: np.ndarray, node: str) -> np.ndarray:
    tensor = pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes())
    request = pb.ExtractRequest(model=model, images=[pb.Image(tensor=tensor)], nodes=[node])
    response = server.stub().Extract(request, timeout=120)
    (out,) = response.results[0].outputs
    assert out.tensor.dtype == "float32"
    return np.frombuffer(out.tensor.data, np.float32).reshape(tuple(out.tensor.shape))


def _sample(server: RunningServer, name: str, model: str) -> float:
    assert server.server.metrics is not None
    return server.server.metrics.registry.get_sample_value(name, {"model": model}) or 0.0


def _counts(server: RunningServer, model: str) -> tuple[float, ...]:
    """(evictions, misses, hits, entries) of one model."""
    return tuple(_sample(server, n, model) for n in (EVICTIONS, MISSES, HITS, ENTRIES))


def _close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    """Served values against the reference: folded BatchNorm agrees to float32 rounding."""
    ref = want.numpy()
    assert got.size == ref.size, (what, got.shape, ref.shape)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(
        got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4 * scale, err_msg=what
    )


def _resnet_reference(weights: Path, x: np.ndarray, modules: list[str]) -> dict[str, torch.Tensor]:
    """Module outputs of a plain torchvision resnet18 (no folding), cloned when they are
    produced: BasicBlock's in-place ReLU and `out += identity` overwrite them later."""
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out.clone())
        )
        for name in modules
    ]
    with torch.inference_mode():
        model(torch.from_numpy(x))
    for handle in handles:
        handle.remove()
    return seen


def test_hot_node_sets_survive_a_client_cycling_through_many(
    server: RunningServer, resnet18_weights: Path
) -> None:
    """More node sets than the cache holds, each used once (the issue's cycling client): they
    are built for their batch, but the hot set stays cached (plain LRU evicted it); a set used
    again earns its place, and a rebuilt extractor returns the very values it did before."""
    runtime = server.server.runtime
    loaded = runtime.model("r18")
    cache = loaded.extractors
    whole, layer1 = ("fc",), ("layer1.1.relu_1",)
    # warm-up built the whole graph and the warmup_nodes set: the cache is full, nothing evicted
    assert list(cache) == [whole, layer1]
    assert _counts(server, "r18") == (0, 0, 0, CACHE)
    warmed = cache[layer1]
    x = _input(1)
    a = _extract(server, "r18", x, "layer1")  # hits: layer1 is the hot set
    for _ in range(3):
        np.testing.assert_array_equal(_extract(server, "r18", x, "layer1"), a)
    assert cache[layer1] is warmed
    cycled = ["layer2.0.bn1", "layer3.1.bn2", "layer2.1.bn2", "layer3.0.bn1", "layer4.0.bn1"]
    outputs = {}
    for name in cycled:
        outputs[name] = _extract(server, "r18", x, name)  # built for its batch
        assert cache.get(layer1) is warmed, list(cache)  # the hot set is never the one to go
        assert len(cache) == CACHE
    evictions, misses, hits, entries = _counts(server, "r18")
    assert (misses, hits, entries) == (5, 4, CACHE)
    # used more than the coldest cached set (its uses are remembered while it is not cached),
    # a set earns its place, and the coldest one leaves
    coldest = min(cache, key=lambda k: loaded.extractor_uses.get(k, 0))
    assert coldest == whole and layer1 in cache
    for _ in range(loaded.extractor_uses[whole]):
        b_again = _extract(server, "r18", x, "layer2.0.bn1")
    assert set(cache) == {layer1, ("layer2.0.bn1",)}
    assert _counts(server, "r18")[0] == evictions + 1
    np.testing.assert_array_equal(b_again, outputs["layer2.0.bn1"])

    ref = _resnet_reference(resnet18_weights, x, ["layer1", "layer2.0.bn1", "layer3.1.bn2"])
    _close(a, ref["layer1"], "layer1")
    _close(b_again, ref["layer2.0.bn1"], "layer2.0.bn1")
    _close(outputs["layer3.1.bn2"], ref["layer3.1.bn2"], "layer3.1.bn2")
    # the other model's cache is its own: r18's evictions are not counted there
    assert _sample(server, EVICTIONS, "compiled") == 0


def _tiny_reference(weights: Path, x: np.ndarray) -> dict[str, torch.Tensor]:
    model = factories.tiny_net(width=4)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        maps = model.stem(torch.from_numpy(x))
        for i, pool in enumerate(model.pools):
            maps = out[f"pools.{i}"] = pool(maps)
        out["head"] = model.head(maps.mean((2, 3)))
    return out


def test_evicted_compiled_extractor_is_recompiled_and_agrees(
    server: RunningServer, tiny_weights: Path
) -> None:
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    runtime = server.server.runtime
    cache = runtime.model("compiled").extractors
    head = ("head",)
    assert list(cache) == [head]  # warm-up compiled the whole graph
    warmed = cache[head]
    assert isinstance(warmed, OptimizedModule)
    x = _input(2)
    before = _extract(server, "compiled", x, "head")  # hit: the warmed-up compiled extractor
    p0 = _extract(server, "compiled", x, "pools.0")  # miss: the cache is full now
    assert _counts(server, "compiled") == (0, 1, 1, CACHE)
    for _ in range(6):  # two sets used more than head: head becomes the coldest and leaves
        _extract(server, "compiled", x, "pools.0")
        _extract(server, "compiled", x, "pools.1")
    assert head not in cache and set(cache) == {("pools.0",), ("pools.1",)}
    evictions, misses, _, _ = _counts(server, "compiled")
    assert evictions >= 1

    graphs = counters["stats"]["unique_graphs"]
    after = _extract(server, "compiled", x, "head")  # rebuilt and compiled again
    assert head not in cache  # used less than the cached two: built for its batch, not kept
    assert counters["stats"]["unique_graphs"] > graphs, "the rebuilt extractor was not compiled"
    assert _counts(server, "compiled")[1] == misses + 1  # one more build
    np.testing.assert_array_equal(after, before)

    ref = _tiny_reference(tiny_weights, x)
    _close(after, ref["head"], "head")
    _close(p0, ref["pools.0"], "pools.0")
