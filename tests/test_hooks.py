"""Forward-hook extraction for models torch.fx cannot trace, and `submodule` serving.

One server holds: a tiny model with data-dependent control flow in its forward (auto → hooks;
the same with extraction = "fx" must fail to load), mobilenet_v2 with its real weights through
hooks and through fx (sharing one base module), and a torchvision detection model at the top
level (hooks) and through its traceable `backbone.body` (fx).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from conftest import RunningServer, encode, photo, start_server
from factories import hold_probe, probe_log
from torch import nn

from layertap.client import FeatureClient, FeatureServiceError
from layertap.server.settings import ConfigError, ModelConfig, Settings, parse_model
from layertap.v1 import layertap_pb2 as pb

DETECTION = "fasterrcnn_mobilenet_v3_large_320_fpn"
HOLD_TAG = "test-hooks-hold"


class Counter(nn.Module):
    """Counts the real forwards that reach it (a probe for early stopping)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Counter.calls += 1
        return x * 1.0


class Branchy(nn.Module):
    """`if <tensor>:` in the root forward: torch.fx cannot trace it (no leaf can fix that). The
    branch taken is the same for every finite input, so batching cannot change the results."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.deep = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), Counter())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x * 2 if torch.isfinite(x).all() else -x
        x = self.deep(self.block(x))
        return self.head(x.mean((2, 3)))


def branchy() -> nn.Module:
    """The same weights on every call, so the test builds its own reference copy."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return Branchy()


@pytest.fixture(scope="module")
def hooks_server() -> Iterator[RunningServer]:
    untraceable = {"factory": "test_hooks:branchy", "weights": "none", "allow_random": True}
    settings = Settings(
        port=0,
        max_batch_size=8,
        max_wait_ms=50,
        models=(
            ModelConfig(name="branchy", input_size=(32, 32), **untraceable),
            ModelConfig(name="branchy-fx", input_size=(32, 32), extraction="fx", **untraceable),
            ModelConfig(
                name="mnv2-hooks", arch="mobilenet_v2", weights="IMAGENET1K_V1", extraction="hooks"
            ),
            ModelConfig(name="mnv2", arch="mobilenet_v2", weights="IMAGENET1K_V1"),
            ModelConfig(name="det", arch=DETECTION, weights="none", allow_random=True),
            ModelConfig(
                name="det-body",
                arch=DETECTION,
                weights="none",
                allow_random=True,
                submodule="backbone.body",
            ),
            # holds the worker inside a forward (factories.hold_probe) while requests queue
            ModelConfig(
                name="hold",
                factory="factories:probe_net",
                kwargs={"tag": HOLD_TAG},
                weights="none",
                allow_random=True,
                input_size=(16, 16),
                leaf_modules=("factories:Probe",),
            ),
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


def _describe(server: RunningServer, model: str) -> pb.DescribeModelResponse:
    return server.stub().DescribeModel(pb.DescribeModelRequest(model=model), timeout=30)


def _manual_hooks(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    """Forward hooks by hand (cloned when fired) on a plain forward: the reference."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:  # None: output kept
            seen.setdefault(name, out.clone())

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    try:
        with torch.inference_mode():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return {k: v.numpy() for k, v in seen.items()}


def test_untraceable_model_is_served_through_hooks(hooks_server: RunningServer) -> None:
    response = _describe(hooks_server, "branchy")
    assert response.extraction_mode == "hooks" and response.model.extraction_mode == "hooks"
    assert "torch.fx cannot trace" in response.extraction_reason
    assert "TraceError" in response.extraction_reason  # the trace error itself, not a paraphrase
    names = [n.name for n in response.nodes]
    # every named module whose output is a tensor, in the order the outputs were produced
    assert names == ["stem", "block.0", "block.1", "block", "deep.0", "deep.1", "deep", "head"]
    by_name = {n.name: n for n in response.nodes}
    assert tuple(by_name["block.0"].shape) == (1, 8, 32, 32) and by_name["block.0"].layout == "NCHW"
    assert by_name["head"].layout == "NC" and by_name["block.0"].op == "call_module"

    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with FeatureClient(hooks_server.target) as client:
        out = client.extract(list(x), model="branchy", nodes=["block.0", "block", "deep.0"])
    ref = _manual_hooks(branchy(), torch.from_numpy(x), ["block.0", "block", "deep.0"])
    for name in ("block.0", "block", "deep.0"):
        np.testing.assert_allclose(out[name], ref[name], atol=1e-5, rtol=1e-5)
    # block.0 comes back pre-ReLU although block.1 is ReLU(inplace=True): cloned when it fired
    assert out["block.0"].min() < 0 and out["block"].min() >= 0


def test_fx_mode_on_an_untraceable_model_fails_to_load_clearly(
    hooks_server: RunningServer,
) -> None:
    with FeatureClient(hooks_server.target) as client:
        info = {m.name: m for m in client.list_models()}["branchy-fx"]
        assert not info.ready
        assert "torch.fx cannot trace it" in info.status_message
        assert "extraction = 'hooks'" in info.status_message
        with pytest.raises(FeatureServiceError) as error:
            client.extract(np.zeros((1, 3, 32, 32), np.float32), model="branchy-fx", nodes="stem")
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_early_stop_skips_deeper_modules(hooks_server: RunningServer) -> None:
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with FeatureClient(hooks_server.target) as client:
        before = Counter.calls
        client.extract(x, model="branchy", nodes=["stem", "block"])
        assert Counter.calls == before  # the forward stopped once `block` had fired
        client.extract(x, model="branchy", nodes=["deep"])
        assert Counter.calls == before + 1


def test_hooks_equal_fx_on_real_weights(hooks_server: RunningServer) -> None:
    images = [encode(photo("chelsea")), encode(photo("coffee"))]
    nodes = ["features.5", "features.18", "features.2.conv.0", "classifier"]
    with FeatureClient(hooks_server.target) as client:
        models = {m.name: m for m in client.list_models()}
        assert models["mnv2-hooks"].extraction_mode == "hooks"
        assert models["mnv2"].extraction_mode == "fx" and models["mnv2"].prefix_tokens == 0
        hooks = client.extract(images, model="mnv2-hooks", nodes=nodes)
        fx = client.extract(images, model="mnv2", nodes=nodes)
        pooled = client.extract(images, model="mnv2-hooks", nodes="features.18", pool="gem")
    reason = _describe(hooks_server, "mnv2-hooks").extraction_reason
    assert reason.startswith("configured")
    for name in nodes:
        assert hooks[name].shape == fx[name].shape, name
        np.testing.assert_allclose(hooks[name], fx[name], atol=1e-4, rtol=1e-4)
    assert int(np.argmax(hooks["classifier"][0])) in {281, 282, 285}  # a cat: real weights
    gem = np.cbrt((np.clip(fx["features.18"], 1e-6, None) ** 3).mean((2, 3)))
    np.testing.assert_allclose(pooled["features.18"], gem, atol=1e-4, rtol=1e-4)


def test_detection_model_top_level_hooks_and_backbone_body_fx(
    hooks_server: RunningServer,
) -> None:
    det, body = _describe(hooks_server, "det"), _describe(hooks_server, "det-body")
    assert det.extraction_mode == "hooks" and "torch.fx cannot trace" in det.extraction_reason
    assert "not nodes" in det.extraction_reason  # tuple/dict outputs are said to be left out
    assert body.extraction_mode == "fx"
    # the whole model normalises inside its transform; its backbone body gets ImageNet stats
    assert list(det.model.preprocessing.mean) == [0, 0, 0]
    assert list(det.model.preprocessing.std) == [1, 1, 1]
    assert np.allclose(body.model.preprocessing.mean, [0.485, 0.456, 0.406])
    assert list(det.model.input_size) == [320, 320] == list(body.model.input_size)
    names = {n.name for n in det.nodes}
    assert "backbone.body.16" in names and "rpn.head.conv" in names
    assert "rpn" not in names and "roi_heads" not in names  # tuple outputs: not nodes
    assert [m.name for m in body.modules][1] == "0"  # the submodule is the served root

    image = encode(photo("astronaut"))
    with FeatureClient(hooks_server.target) as client:
        top = client.extract(image, model="det", nodes=["backbone.body.16", "backbone.body.4"])
        sub = client.extract(image, model="det-body", nodes=["16", "4"])
        with pytest.raises(FeatureServiceError) as error:
            client.extract(image, model="det", nodes="rpn")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "tuple" in error.value.details
    assert top["backbone.body.16"].shape == (1, 960, 10, 10)
    np.testing.assert_allclose(top["backbone.body.16"], sub["16"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(top["backbone.body.4"], sub["4"], atol=1e-4, rtol=1e-4)


def test_concurrent_requests_with_different_node_sets(hooks_server: RunningServer) -> None:
    """Requests batched together share one hooked forward over the union of their node sets;
    each gets its own images' outputs for its own nodes. By default a forward is shared by the
    requests whose deepest node is the same (share_across_depths off): here each deepest node
    has two requests, with different node sets but for `stem`. The worker is held inside a
    forward of another model until all ten have queued, so each pair meets in one batch."""
    rng = np.random.default_rng(2)
    node_sets = [
        ["stem"],
        ["block.0", "deep"],
        ["head"],
        ["block", "stem"],
        ["deep.0"],
        ["stem"],
        ["deep", "stem"],
        ["block.0", "head"],
        ["block"],
        ["deep.0", "block.1"],
    ]
    inputs = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in node_sets]
    results: list[Any] = [None] * len(node_sets)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(node_sets))

    def call(i: int) -> None:
        try:
            with FeatureClient(hooks_server.target) as client:
                barrier.wait(30)
                results[i] = client.extract(inputs[i], model="branchy", nodes=node_sets[i])
        except BaseException as exc:  # reported below, on the test thread
            errors.append(exc)

    def until(condition: Any, what: str) -> None:
        give_up = time.monotonic() + 60  # bounds a hang; the conditions are events
        while not condition():
            assert not errors, errors
            assert time.monotonic() < give_up, f"timed out waiting for {what}"
            time.sleep(0.005)

    batcher = hooks_server.server.batcher
    forwards = len(probe_log(HOLD_TAG))  # the warm-up's
    hold = hold_probe(HOLD_TAG)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(node_sets))]
    try:
        stub = hooks_server.stub()
        blocker = stub.Extract.future(
            pb.ExtractRequest(
                model="hold",
                images=[pb.Image(encoded=encode(photo("coffee")))],
                nodes=["mean"],
            ),
            timeout=60,
        )
        until(lambda: len(probe_log(HOLD_TAG)) > forwards, "the worker to be held")
        for t in threads:
            t.start()
        until(lambda: batcher.queued == len(node_sets), "all ten requests to queue")
    finally:
        hold.set()
    blocker.result(60)
    for t in threads:
        t.join(60)
    assert not errors, errors
    # each shared its forward with the other request of its deepest node
    assert [r.metadata.batch_size for r in results] == [2] * len(node_sets)
    model = branchy()
    for i, nodes in enumerate(node_sets):
        ref = _manual_hooks(model, torch.from_numpy(inputs[i]), nodes)
        assert sorted(results[i].keys()) == sorted(nodes)
        for name in nodes:
            np.testing.assert_allclose(results[i][name], ref[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"extraction": "trace"}, "extraction must be one of"),
        ({"prefix_tokens": -2}, "prefix_tokens must be >= 0"),
        ({"submodule": "backbone/body"}, "dotted module path"),
    ],
)
def test_bad_extraction_settings_are_refused(entry: dict[str, Any], message: str) -> None:
    from layertap.server.model_config import validate_model

    with pytest.raises(ConfigError, match=message):
        validate_model(parse_model({"name": "m", "arch": "resnet18", **entry}))
