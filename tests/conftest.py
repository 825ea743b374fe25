"""Shared fixtures: a real layertap server on 127.0.0.1:0 in a background thread, real photos.

The server runs its own asyncio loop in a thread so tests can use plain synchronous gRPC
channels and clients, exactly as users do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from layertap.server.app import Server, channel_options, create_server
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2_grpc as pb_grpc

# compile = "auto" (every model's default) compiles real models at load, 20-60 s each on this
# CPU: the tests' servers stay eager unless a test sets its own compile_budget_s (start_server
# below) or its own LAYERTAP_COMPILE_BUDGET_S (`layertap serve` subprocesses inherit this one).
# tests/test_compile.py checks automatic compilation itself.
os.environ.setdefault("LAYERTAP_COMPILE_BUDGET_S", "0")
# Tests never bind fixed ports: `layertap serve` subprocesses get a free HTTP port too.
os.environ.setdefault("LAYERTAP_HTTP_PORT", "0")


@dataclass
class RunningServer:
    server: Server
    port: int
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The HTTP API's base URL (the server's http_port, bound at start)."""
        assert self.server.http is not None, "this server runs without HTTP (http = false)"
        return f"http://127.0.0.1:{self.server.http.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=channel_options(self.server.settings))

    def stub(self) -> pb_grpc.FeatureServiceStub:
        return pb_grpc.FeatureServiceStub(self.channel())

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop (e.g. to inspect the batcher)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def start_server(settings: Settings, ready_timeout: float = 600) -> RunningServer:
    """Start a server in a thread and wait until all its models have loaded.

    Tests never bind fixed ports: a default metrics or HTTP port becomes 0 (any free port). A
    default compile_budget_s becomes 0: no automatic compilation unless the test asks for it."""
    if settings.metrics_port == Settings().metrics_port:
        settings = dataclasses.replace(settings, metrics_port=0)
    if settings.http_port == Settings().http_port:
        settings = dataclasses.replace(settings, http_port=0)
    if settings.compile_budget_s == Settings().compile_budget_s:  # see the top of this file
        settings = dataclasses.replace(settings, compile_budget_s=0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server", daemon=True)
    thread.start()

    async def boot() -> tuple[Server, int]:
        server, port = await create_server(settings)
        await server.start()
        await server.wait_ready(ready_timeout)
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(boot(), loop).result(ready_timeout)
    return RunningServer(server, port, loop, thread)


MOBILENET = ModelConfig(name="m", arch="mobilenet_v2", weights="IMAGENET1K_V1")
"""mobilenet_v2 with its real ImageNet weights, served as "m"."""


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[RunningServer]:
    """start_server for a `with` block (or a fixture's yield): stopped at the end."""
    running = start_server(settings)
    try:
        yield running
    finally:
        running.stop()


def requests_counted(metrics_port: int | None) -> dict[tuple[str, str], float]:
    """layertap_requests_total by (method, code), read from the server's /metrics page."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.labels["method"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "layertap_requests"
        for s in family.samples
        if s.name == "layertap_requests_total"
    }


def probe_config(
    name: str, size: int = 32, probe: dict[str, Any] | None = None, **config: Any
) -> ModelConfig:
    """A factories.probe_net model tagged `name` (so a test can hold or fail its forwards),
    random init, input size × size; `probe` goes to the factory, `config` to ModelConfig."""
    return ModelConfig(
        name=name,
        factory="factories:probe_net",
        kwargs={"tag": name, **(probe or {})},
        weights="none",
        allow_random=True,
        input_size=(size, size),
        leaf_modules=("factories:Probe",),
        **config,
    )


def tiny_weights(path: Path, width: int, seed: int) -> Path:
    """A two-convolution factories.tiny_net of `width`, seeded, saved to `path`."""
    import factories
    import torch

    torch.manual_seed(seed)
    torch.save(factories.tiny_net(width=width, convs=2).state_dict(), path)
    return path


def tiny_config(name: str, weights: Path, width: int, size: int = 32, **config: Any) -> ModelConfig:
    """The tiny_net of `tiny_weights` served from its file at input size × size."""
    return ModelConfig(
        name=name,
        factory="factories:tiny_net",
        kwargs={"width": width, "convs": 2},
        weights=str(weights),
        input_size=(size, size),
        **config,
    )


def save_random_weights(arch: str, path: Path, **kwargs: Any) -> Path:
    """Random-init weights saved to a file, so the server and the test share the exact model.

    torchvision's init leaves parts of a model trivial, and a test on such weights cannot see
    those parts go wrong: every BatchNorm is the identity (running mean 0, variance 1, weight 1,
    bias 0), so dropping one or folding it wrongly changes outputs by ~1e-5 relative, and some
    weights start at zero (ViT's classification head and class token), so their outputs are
    all zeros. Both are replaced by seeded random values (randomise_trivial_init)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    randomise_trivial_init(model)
    torch.save(model.state_dict(), path)
    return path


def randomise_trivial_init(model: Any, seed: int = 0) -> Any:
    """In place, seeded (its own generator): each BatchNorm gets running mean ~ N(0, 0.2^2),
    running variance ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.1^2) (a per-channel
    affine map far from the identity, yet keeping activations in range through a hundred of
    them: densenet121); each all-zero parameter of two or more dimensions (a weight, a token)
    gets N(0, 0.02^2). Models without either are left as they are. Returns the model."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            n = module.num_features
            if module.running_mean is not None and module.running_var is not None:
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if module.weight is not None and module.bias is not None:
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
        for param in model.parameters():
            if param.dim() >= 2 and param.is_floating_point() and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_weights("resnet18", tmp_path_factory.mktemp("w") / "resnet18.pth")


@pytest.fixture(scope="session")
def small_server(resnet18_weights: Path) -> Iterator[RunningServer]:
    """resnet18 (random weights from a file), mobilenet_v2 (real ImageNet weights), a factory."""
    settings = Settings(
        port=0,
        max_batch_size=8,
        max_wait_ms=20,
        max_images_per_request=16,
        max_image_pixels=30_000_000,
        models=(
            ModelConfig(name="resnet18", arch="resnet18", weights=str(resnet18_weights)),
            ModelConfig(name="mobilenet_v2", arch="mobilenet_v2", weights="IMAGENET1K_V1"),
            ModelConfig(
                name="tiny",
                factory="factories:tiny_net",
                kwargs={"width": 6},
                weights="none",
                allow_random=True,
                input_size=(64, 64),
            ),
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


# --- real photos -------------------------------------------------------------------------
def relative_error(
    got: np.ndarray, want: Any, what: str, rtol: float, min_scale: float = 1e-3
) -> float:
    """max |got - want| over max |want|, asserted <= rtol, and returned. The reference must be
    worth comparing: an all-zero, vanishing or flat output (ViT's zero-initialised head, a deep
    layer behind identity BatchNorms) would match anything small."""
    ref = want.detach().cpu().numpy() if hasattr(want, "detach") else np.asarray(want)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    scale = float(np.abs(ref).max())
    spread = float(ref.std())
    assert scale >= min_scale and spread >= 0.01 * scale, (
        f"{what}: trivial reference (max |x| {scale:.3g}, std {spread:.3g}): "
        "nothing to compare against"
    )
    err = float(np.abs(got - ref).max()) / scale
    assert err <= rtol, f"{what}: max |diff| is {err:.3g} of max |reference|, over {rtol}"
    return err


def photo(name: str) -> np.ndarray:
    """A real RGB photo as uint8 HWC: astronaut, chelsea, coffee, rocket, china, grace_hopper."""
    if name == "china":
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image("china.jpg"))
    if name == "grace_hopper":
        import matplotlib.cbook
        from PIL import Image

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
            return np.asarray(Image.open(fh).convert("RGB"))
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def encode(array: np.ndarray, fmt: str = "JPEG", **save_kwargs: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **save_kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def jpegs() -> dict[str, bytes]:
    return {n: encode(photo(n)) for n in ("astronaut", "chelsea", "coffee", "china")}


@pytest.fixture(scope="session")
def triton_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the real Triton clients (PyPI tritonclient[grpc,http]) and layertap's own
    client, built once per run: tritonclient's stubs and layertap's v2 stubs both define
    inference.*, so the v2 tests call from this venv, never from the server's process."""
    import subprocess
    import venv

    env_dir = tmp_path_factory.mktemp("triton") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    root = Path(__file__).resolve().parents[1]
    # scikit-learn and pillow: README's Triton example reads its photo from sklearn's samples
    packages = [str(root), "tritonclient[grpc,http]", "scikit-learn", "pillow"]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True, timeout=900)
    return python
