"""The batching engine on a real server: warm-up pairs, channels_last, autocast, torch.compile,
forward sharing on and off, and images dropped before compute (deadline vs cancel) counted.

Models are small (tiny_net, probe_net, a random-weights resnet18 file) so each server starts in
seconds on CPU; the probe's log says exactly which images the worker computed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import factories
import grpc
import numpy as np
import pytest
import torch
from conftest import RunningServer, photo, probe_config, start_server

from layertap.client import FeatureClient
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

SIZE = 32


def _until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.005)


def _tiny(name: str, **kwargs: object) -> ModelConfig:
    return ModelConfig(
        name=name,
        factory="factories:tiny_net",
        kwargs={"width": 4},
        weights="none",
        allow_random=True,
        input_size=(SIZE, SIZE),
        **kwargs,  # type: ignore[arg-type]
    )


def _probe(name: str, **kwargs: object) -> ModelConfig:
    return probe_config(name, SIZE, **kwargs)


def _image(value: float, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).uniform(-1, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    x.flat[0] = value
    return x


def _request(model: str, x: np.ndarray, nodes: list[str]) -> pb.ExtractRequest:
    tensor = pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes())
    return pb.ExtractRequest(model=model, images=[pb.Image(tensor=tensor)], nodes=nodes)


def _seen(tag: str) -> list[float]:
    return [m for e in factories.probe_log(tag) for m in e["max"]]  # type: ignore[attr-defined]


def _sample(server: RunningServer, name: str, **labels: str) -> float:
    assert server.server.metrics is not None
    return server.server.metrics.registry.get_sample_value(name, labels) or 0.0


# --- warm-up pairs, compile ------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_server(resnet18_weights: Path) -> Iterator[RunningServer]:
    weights = str(resnet18_weights)
    settings = Settings(
        port=0,
        models=(
            _tiny(
                "warm",
                warmup_nodes=(("stem", "pools.0"), ("head",)),
                warmup_batch_sizes=(1, 2),
            ),
            _tiny("bad-warm", warmup_nodes=(("stem", "no_such_node"),)),
            _tiny("eager", compile="default", compile_backend="eager", warmup_batch_sizes=(1, 2)),
            _tiny("fp16-on-cpu", autocast="float16"),
            ModelConfig(name="r18", arch="resnet18", weights=weights),
            ModelConfig(name="r18-cl", arch="resnet18", weights=weights, channels_last=True),
            ModelConfig(name="r18-bf16", arch="resnet18", weights=weights, autocast="bfloat16"),
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


def test_warmup_pairs_are_built_before_the_first_request(engine_server: RunningServer) -> None:
    runtime = engine_server.server.runtime
    cached = set(runtime.model("warm").extractors)
    # resolved full names, in execution order: the key a request for them looks up
    assert {("stem.1", "pools.0"), ("head",)} <= cached, cached
    misses = "layertap_extractor_cache_misses_total"
    hits = "layertap_extractor_cache_hits_total"
    assert _sample(engine_server, misses, model="warm") == 0
    before_hits = _sample(engine_server, hits, model="warm")
    x = _image(1.0)
    response = engine_server.stub().Extract(_request("warm", x, ["pools.0", "stem"]), timeout=30)
    assert [o.node for o in response.results[0].outputs] == ["pools.0", "stem.1"]
    assert _sample(engine_server, misses, model="warm") == 0  # the first request did not build
    assert _sample(engine_server, hits, model="warm") == before_hits + 1


def test_unknown_warmup_node_fails_that_model_with_a_clear_message(
    engine_server: RunningServer,
) -> None:
    with FeatureClient(engine_server.target) as client:
        infos = {m.name: m for m in client.list_models()}
    bad = infos["bad-warm"]
    assert not bad.ready
    assert "warmup_nodes" in bad.status_message and "no_such_node" in bad.status_message
    assert infos["warm"].ready  # the same architecture without the typo is fine


def test_float16_autocast_is_refused_on_cpu(engine_server: RunningServer) -> None:
    with FeatureClient(engine_server.target) as client:
        info = {m.name: m for m in client.list_models()}["fp16-on-cpu"]
    assert not info.ready
    assert "needs a CUDA device" in info.status_message and "bfloat16" in info.status_message


def test_compiled_extractor_is_compiled_before_ready_and_matches(
    engine_server: RunningServer,
) -> None:
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    runtime = engine_server.server.runtime
    (warmed,) = runtime.model("eager").extractors.values()  # the warm-up's whole-graph one
    assert isinstance(warmed, OptimizedModule)
    graphs_at_ready = counters["stats"]["unique_graphs"]
    assert graphs_at_ready >= 1, "nothing was compiled before the model reported ready"
    stub = engine_server.stub()
    images = [
        pb.Image(tensor=pb.Tensor(dtype="float32", shape=[1, 3, SIZE, SIZE], data=x.tobytes()))
        for x in (_image(1.0, 1), _image(2.0, 2))
    ]
    last = runtime.model("eager").catalog.nodes[-1].name
    compiled = stub.Extract(pb.ExtractRequest(model="eager", images=images, nodes=[last]))
    # "warm" shares the base module (same factory, kwargs and weights): the uncompiled reference
    plain = stub.Extract(pb.ExtractRequest(model="warm", images=images, nodes=[last]))
    assert counters["stats"]["unique_graphs"] == graphs_at_ready, "a request recompiled"
    for a, b in zip(compiled.results, plain.results, strict=True):
        got = np.frombuffer(a.outputs[0].tensor.data, np.float32)
        want = np.frombuffer(b.outputs[0].tensor.data, np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --- channels_last, autocast -----------------------------------------------------------
def test_channels_last_equals_the_default_layout(engine_server: RunningServer) -> None:
    runtime = engine_server.server.runtime
    cl = runtime.model("r18-cl").weights.module
    assert cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert runtime.model("r18").weights.module is not cl  # not converted under the default
    images = [photo("astronaut"), photo("chelsea")]
    with FeatureClient(engine_server.target) as client:
        ref = client.extract(images, model="r18", nodes=["layer3", "fc"])
        got = client.extract(images, model="r18-cl", nodes=["layer3", "fc"])
    for key in ("layer3", "fc"):
        assert got[key].dtype == np.float32 and got[key].flags.c_contiguous
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-4)


def test_bfloat16_autocast_is_close_and_reported(engine_server: RunningServer) -> None:
    images = [photo("astronaut"), photo("coffee")]
    with FeatureClient(engine_server.target) as client:
        infos = {m.name: m for m in client.list_models()}
        ref = client.extract(images, model="r18", nodes="layer4", pool="avg")
        got = client.extract(images, model="r18-bf16", nodes="layer4", pool="avg")
        raw = client.extract(images[:1], model="r18-bf16", nodes="layer1")
    assert infos["r18-bf16"].compute_dtype == "bfloat16"
    assert infos["r18"].compute_dtype == "float32"
    a, b = got["layer4"], ref["layer4"]
    assert a.dtype == np.float32 and raw["layer1"].dtype == np.float32  # the requested dtype
    assert not np.array_equal(a, b), "bfloat16 autocast changed nothing: was it applied?"
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.99, cosine
    np.testing.assert_allclose(a, b, rtol=0.1, atol=0.05)


# --- forward sharing on and off ----------------------------------------------------------
@pytest.mark.parametrize("policy", ["depth", "across", "off"])
def test_share_forwards_policies(policy: str) -> None:
    """Default: node sets ending at the same deepest node share a forward, a shallower set
    does not ride a deeper forward; share_across_depths: everything shares; off: only equal
    node sets."""
    name = f"share-{policy}"
    settings = Settings(
        port=0,
        metrics=False,
        max_wait_ms=50,
        share_forwards=policy != "off",
        share_across_depths=policy == "across",
        models=(_probe(name),),
    )
    running = start_server(settings)
    hold = factories.hold_probe(name)  # type: ignore[attr-defined]
    try:
        stub = running.stub()
        blocker = stub.Extract.future(_request(name, _image(11.0), ["conv"]), timeout=30)
        _until(lambda: 11.0 in _seen(name), what="the blocker to start")
        a = stub.Extract.future(_request(name, _image(21.0, 1), ["conv", "mean"]), timeout=30)
        b = stub.Extract.future(_request(name, _image(22.0, 2), ["relu", "mean"]), timeout=30)
        c = stub.Extract.future(_request(name, _image(23.0, 3), ["conv"]), timeout=30)
        _until(lambda: running.server.batcher.queued == 3, what="three queued requests")
        hold.set()
        blocker.result(30)
        ra, rb, rc = a.result(30), b.result(30), c.result(30)
    finally:
        hold.set()
        running.stop()
    assert [o.key for o in ra.results[0].outputs] == ["conv", "mean"]
    assert [o.key for o in rb.results[0].outputs] == ["relu", "mean"]
    assert [o.key for o in rc.results[0].outputs] == ["conv"]
    sizes = (ra.metadata.batch_size, rb.metadata.batch_size, rc.metadata.batch_size)
    expected = {"depth": (2, 2, 1), "across": (3, 3, 3), "off": (1, 1, 1)}[policy]
    assert sizes == expected, sizes


# --- drops: deadline vs cancel -----------------------------------------------------------
def test_deadline_and_cancel_are_counted_as_drops_and_never_computed() -> None:
    settings = Settings(port=0, max_wait_ms=50, models=(_probe("dl"),))
    running = start_server(settings)
    hold = factories.hold_probe("dl")  # type: ignore[attr-defined]
    try:
        stub = running.stub()
        blocker = stub.Extract.future(_request("dl", _image(11.0), ["mean"]), timeout=30)
        _until(lambda: 11.0 in _seen("dl"), what="the blocker to start")
        late = stub.Extract.future(_request("dl", _image(77.0), ["mean"]), timeout=1.0)
        gone = stub.Extract.future(_request("dl", _image(88.0), ["mean"]), timeout=30)
        _until(lambda: running.server.batcher.queued == 2, what="two queued requests")
        gone.cancel()
        with pytest.raises(grpc.RpcError) as info:
            late.result(10)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        both = {"deadline": 1, "cancelled": 1}
        _until(lambda: running.server.batcher.dropped == both, what="both drops on the server")
        hold.set()
        blocker.result(30)
        name = "layertap_dropped_images_total"
        _until(lambda: _sample(running, name, reason="deadline") == 1, what="the deadline drop")
        _until(lambda: _sample(running, name, reason="cancelled") == 1, what="the cancel drop")
        after = stub.Extract(_request("dl", _image(12.0), ["mean"]), timeout=30)
        assert len(after.results) == 1
    finally:
        hold.set()
        running.stop()
    assert 77.0 not in _seen("dl") and 88.0 not in _seen("dl"), "a dropped image was computed"
    assert running.server.batcher.dropped == {"deadline": 1, "cancelled": 1}
