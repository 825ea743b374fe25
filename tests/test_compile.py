"""torch.compile with the default backend, inductor: C++ kernels built by the machine's compiler.

A small tiny_net from a weights file is served twice, compiled (compile = "default",
compile_backend left at its default) and not; warm-up compiles the whole graph for both batch
sizes before the model reports ready. Its values must equal the eager model's within float32
rounding: against the uncompiled entry (same preprocessing, real photos) and against a reference
computed here from the weights file. One extra node set compiles on its first request.

Inductor's first compile in a process takes about 20-30 s on a 2-core CPU (cold cache).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import factories
import numpy as np
import pytest
import torch
from conftest import RunningServer, photo, start_server, tiny_config, tiny_weights

from layertap.client import FeatureClient
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

SIZE = 32
WIDTH = 8


def _inductor_compiles() -> int:
    """Graphs inductor compiled in this process (its FX graph cache hit or missed)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["inductor"]["fxgraph_cache_miss"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_weights(tmp_path_factory.mktemp("compile") / "tiny.pth", WIDTH, seed=1)


def _entry(name: str, weights: Path, **kwargs: object) -> ModelConfig:
    return tiny_config(name, weights, WIDTH, SIZE, **kwargs)


@pytest.fixture(scope="module")
def server(weights: Path) -> Iterator[tuple[RunningServer, int]]:
    """The running server and how many graphs inductor compiled while it loaded."""
    assert shutil.which("g++") or shutil.which("cc"), "inductor on the CPU needs a C++ compiler"
    before = _inductor_compiles()
    settings = Settings(
        port=0,
        models=(
            _entry("inductor", weights, compile="default", warmup_batch_sizes=(1, 2)),
            _entry("eager", weights),
        ),
    )
    running = start_server(settings)
    yield running, _inductor_compiles() - before
    running.stop()


def _raw(x: np.ndarray) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(dtype="float32", shape=[1, *x.shape], data=x.tobytes()))


def _values(response: pb.ExtractResponse) -> list[dict[str, np.ndarray]]:
    return [
        {
            o.key: np.frombuffer(o.tensor.data, np.float32).reshape(tuple(o.tensor.shape))
            for o in result.outputs
        }
        for result in response.results
    ]


def _reference(weights: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model = factories.tiny_net(width=WIDTH, convs=2)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    with torch.inference_mode():
        stem = model.stem(x)
        out = {"stem.2": stem, "pools.0": model.pools[0](stem)}
        mean = model.pools(stem).mean((2, 3))
        out["mean"], out["head"] = mean, model.head(mean)
    return out


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = float(np.abs(want).max())
    assert scale > 0, what
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


def test_inductor_compiles_before_ready_and_matches_eager(
    server: tuple[RunningServer, int], weights: Path
) -> None:
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    running, compiled_at_load = server
    runtime = running.server.runtime
    cfg = runtime.model("inductor").config
    assert (cfg.compile, cfg.compile_backend) == ("default", "inductor")  # the default backend
    (warmed,) = runtime.model("inductor").extractors.values()
    assert isinstance(warmed, OptimizedModule)
    assert compiled_at_load >= 1, "inductor compiled nothing while the model loaded"
    assert not isinstance(runtime.model("eager").extractors[("head",)], OptimizedModule)

    stub = running.stub()
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    graphs = counters["stats"]["unique_graphs"]
    request = pb.ExtractRequest(model="inductor", images=[_raw(x) for x in xs], nodes=["head"])
    got = _values(stub.Extract(request, timeout=120))
    assert counters["stats"]["unique_graphs"] == graphs, "a warmed-up batch size recompiled"
    ref = _reference(weights, torch.from_numpy(xs))
    for i in range(2):
        _close(got[i]["head"], ref["head"][i].numpy(), f"head of image {i}")

    # a node set nobody warmed up: compiled by inductor on its first request
    before = _inductor_compiles()
    nodes = ["stem.2", "pools.0", "mean"]
    request = pb.ExtractRequest(model="inductor", images=[_raw(xs[0])], nodes=nodes)
    (maps,) = _values(stub.Extract(request, timeout=300))
    assert _inductor_compiles() > before
    assert isinstance(runtime.model("inductor").extractors[tuple(nodes)], OptimizedModule)
    for node in nodes:
        _close(maps[node], ref[node][0].numpy(), node)


def test_inductor_matches_the_uncompiled_entry_on_photos(
    server: tuple[RunningServer, int],
) -> None:
    running, _ = server
    images = [photo("astronaut"), photo("coffee")]
    with FeatureClient(running.target) as client:
        got = client.extract(images, model="inductor", nodes="head")
        want = client.extract(images, model="eager", nodes="head")
    assert not np.array_equal(want["head"][0], want["head"][1])  # two different inputs
    _close(got["head"], want["head"], "head")
