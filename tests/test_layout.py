"""channels_last unset ("auto"): chosen at load on the CPU by timing the model's folded
deepest-node extractor in both layouts, kept only when it runs there and is clearly faster;
explicit values are honoured without timing."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import RunningServer, start_server
from factories import tiny_net, viewing_net

from layertap.server import loading
from layertap.server.settings import ModelConfig, Settings
from layertap.server.worker import ModelRuntime
from layertap.v1 import layertap_pb2 as pb

SIZE = 32


FACTORIES = {"factories:tiny_net": tiny_net, "factories:viewing_net": viewing_net}


def _model(name: str, factory: str, folder: Path, **kwargs: object) -> ModelConfig:
    """A factory entry whose weights are a file, written here from a fresh instance."""
    path = folder / f"{name}.pth"
    build_kwargs: dict[str, object] = kwargs.get("kwargs", {})  # type: ignore[assignment]
    torch.save(FACTORIES[factory](**build_kwargs).state_dict(), path)
    return ModelConfig(
        name=name,
        factory=factory,
        weights=str(path),
        input_size=(SIZE, SIZE),
        **kwargs,  # type: ignore[arg-type]
    )


def _served_equals_fresh_model(running: RunningServer, cfg: ModelConfig, node: str) -> None:
    """The served output equals the model's own forward on a new instance the test builds
    from the factory and the entry's weights file (default layout), not the server's module."""
    model = FACTORIES[str(cfg.factory)](**cfg.kwargs)
    model.load_state_dict(torch.load(cfg.weights, map_location="cpu", weights_only=True))
    model.eval()
    x = np.random.default_rng(0).standard_normal((3, SIZE, SIZE)).astype(np.float32)
    tensor = pb.Tensor(dtype="float32", shape=[3, SIZE, SIZE], data=x.tobytes())
    request = pb.ExtractRequest(model=cfg.name, images=[pb.Image(tensor=tensor)], nodes=[node])
    response = running.stub().Extract(request, timeout=30)
    got = np.frombuffer(response.results[0].outputs[0].tensor.data, np.float32)
    with torch.inference_mode():
        want = model(torch.from_numpy(x)[None]).float().numpy()[0]
    np.testing.assert_allclose(got, want.ravel(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("faster", [True, False])
def test_auto_keeps_channels_last_only_when_clearly_faster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, faster: bool
) -> None:
    def fake_ms(module: object, x: torch.Tensor, runs: int = 3) -> float:
        if x.is_contiguous():  # channels-last: 20 % or 5 % faster
            return 30.0
        return 24.0 if faster else 28.5

    monkeypatch.setattr(loading, "_forward_ms", fake_ms)
    cfg = _model("tiny", "factories:tiny_net", tmp_path, kwargs={"convs": 2})
    running = start_server(Settings(port=0, metrics=False, models=(cfg,)))
    try:
        loaded = running.server.runtime.model("tiny")
        assert loaded.channels_last is faster
        conv = loaded.weights.module.stem[0]
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) is faster
        assert conv.weight.is_contiguous() is not faster
        _served_equals_fresh_model(running, cfg, "head")
    finally:
        running.stop()


def test_a_model_that_cannot_run_channels_last_stays_in_the_default_layout(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(loading, "SMALL_FORWARD_MS", 0.0)  # time it although it is tiny
    cfg = _model("viewing", "factories:viewing_net", tmp_path, extraction="fx")
    with caplog.at_level(logging.INFO, logger="layertap.server.worker"):
        running = start_server(Settings(port=0, metrics=False, models=(cfg,)))
    try:
        loaded = running.server.runtime.model("viewing")
        assert "a channels-last forward failed" in caplog.text  # it was tried, and failed
        assert loaded.channels_last is False
        assert loaded.weights.module.conv.weight.is_contiguous()
        _served_equals_fresh_model(running, cfg, "head")
    finally:
        running.stop()


def test_explicit_values_are_not_timed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def never(module: object, x: object, runs: int = 3) -> float:
        raise AssertionError("an explicit channels_last was timed")

    monkeypatch.setattr(loading, "_forward_ms", never)
    models = (
        _model("on", "factories:tiny_net", tmp_path, channels_last=True),
        _model("off", "factories:tiny_net", tmp_path, channels_last=False, kwargs={"width": 6}),
    )
    running = start_server(Settings(port=0, metrics=False, models=models))
    try:
        assert running.server.runtime.model("on").channels_last is True
        assert running.server.runtime.model("off").channels_last is False
        for cfg in models:
            _served_equals_fresh_model(running, cfg, "head")
    finally:
        running.stop()


def test_small_models_and_warmup_off_are_not_timed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[int] = []

    def fake_ms(module: object, x: torch.Tensor, runs: int = 3) -> float:
        calls.append(runs)
        return 1.0  # under SMALL_FORWARD_MS

    monkeypatch.setattr(loading, "_forward_ms", fake_ms)
    cfg = _model("small", "factories:tiny_net", tmp_path, kwargs={"convs": 2})
    for warmup, timed in ((True, [1]), (False, [])):
        calls.clear()
        running = start_server(Settings(port=0, metrics=False, warmup=warmup, models=(cfg,)))
        try:
            assert running.server.runtime.model("small").channels_last is False
        finally:
            running.stop()
        assert calls == timed, warmup


@pytest.mark.parametrize(
    "module",
    [
        # channels_last is a 4-D format: 5-D weights keep the default layout
        torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.Conv2d(4, 4, 1)),
        # one convolution (a ViT's patch embedding) and the rest linear: nothing to gain
        torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Flatten(2)),
    ],
    ids=["5-D weights", "one convolution"],
)
def test_models_without_convolutions_to_speed_up_are_never_timed(
    module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_timing(*_: object, **__: object) -> float:
        raise AssertionError("timed a model the layout cannot speed up")

    monkeypatch.setattr(loading, "_forward_ms", no_timing)
    runtime = ModelRuntime(Settings(models=()), device="cpu")
    try:
        loaded = SimpleNamespace(
            config=ModelConfig(name="v", factory="x:y"),
            weights=SimpleNamespace(module=module.eval()),
            catalog=SimpleNamespace(nodes=["n"]),
        )
        assert runtime._loader._pick_channels_last(loaded) is False  # type: ignore[arg-type]
    finally:
        runtime.shutdown()
