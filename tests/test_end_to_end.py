"""The real client SDK and CLI against a real server with real photos and real ImageNet weights."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, photo

from layertap.client import AsyncFeatureClient, FeatureClient, FeatureServiceError
from layertap.client.cli import main as cli_main

MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def top1(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def test_real_weights_classify_real_photos(small_server: RunningServer) -> None:
    """mobilenet_v2's logits node on real photos gives ImageNet's right answers."""
    with FeatureClient(small_server.target) as client:
        info = {m.name: m for m in client.list_models()}["mobilenet_v2"]
        assert info.weights_sha256 == MOBILENET_SHA256 and info.ready and not info.random_weights
        out = client.extract(
            [photo("chelsea"), encode(photo("coffee"))], model="mobilenet_v2", nodes="classifier"
        )
    logits = out["classifier"]
    assert logits.shape == (2, 1000)
    assert top1(logits[0]) in {281, 282, 285}  # tabby / tiger cat / Egyptian cat
    assert top1(logits[1]) in {504, 967, 968}  # coffee mug / espresso / cup
    assert out.nodes["classifier"] == "classifier.1"
    assert out.metadata.weights_sha256 == MOBILENET_SHA256


def test_quickstart_gem_cosine(small_server: RunningServer) -> None:
    """The README quickstart: GeM descriptors of two real photos and their cosine similarity."""
    from sklearn.datasets import load_sample_image

    china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
    with FeatureClient(small_server.target) as client:
        out = client.extract(
            [china, flower, china[:, ::-1].copy()],
            model="mobilenet_v2",
            nodes="features.18",
            pool="gem",
            normalize=True,
        )
    d = out["features.18"]
    assert d.shape == (3, 1280)
    assert np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-5)
    different, mirrored = float(d[0] @ d[1]), float(d[0] @ d[2])
    assert mirrored > 0.9 and mirrored > different + 0.1


def test_every_input_kind_gives_the_same_features(
    small_server: RunningServer, tmp_path: Path
) -> None:
    from PIL import Image

    arr = photo("astronaut")
    png = encode(arr, "PNG")
    path = tmp_path / "astronaut.png"
    path.write_bytes(png)
    with FeatureClient(small_server.target) as client:
        out = client.extract(
            [arr, png, str(path), Image.fromarray(arr)],
            model="resnet18",
            nodes=["layer2"],
            pool="avg",
        )
    d = out["layer2"]
    for row in d[1:]:
        np.testing.assert_allclose(row, d[0], atol=1e-5)


def test_raw_output_dtypes_and_layout(small_server: RunningServer) -> None:
    with FeatureClient(small_server.target) as client:
        f32 = client.extract(photo("rocket"), model="resnet18", nodes={"layer3": "mid"})
        f16 = client.extract(
            photo("rocket"), model="resnet18", nodes={"layer3": "mid"}, dtype="float16"
        )
        bf16 = client.extract(
            photo("rocket"), model="resnet18", nodes={"layer3": "mid"}, dtype="bfloat16"
        )
    assert f32["mid"].shape == (1, 256, 14, 14) and f32.layouts["mid"] == "NCHW"
    assert f16["mid"].dtype == np.float16
    np.testing.assert_allclose(f16["mid"].astype(np.float32), f32["mid"], rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(bf16["mid"], f32["mid"], rtol=2e-2, atol=2e-2)


def test_async_client_and_batching_under_concurrency(small_server: RunningServer) -> None:
    images = [photo(n) for n in ("astronaut", "chelsea", "coffee", "rocket")]

    async def run() -> list[int]:
        async with AsyncFeatureClient(small_server.target) as client:
            calls = [
                client.extract(images[i % 4], model="resnet18", nodes="layer4", pool="gem")
                for i in range(24)
            ]
            results = await asyncio.gather(*calls)
        for i, r in enumerate(results):
            assert r["layer4"].shape == (1, 512)
            np.testing.assert_allclose(r["layer4"], results[i % 4]["layer4"], atol=1e-5)
        return [r.metadata.batch_size for r in results]

    sizes = asyncio.run(run())
    assert max(sizes) > 1, "concurrent requests should have shared a forward"


def test_client_errors_carry_code_and_details(small_server: RunningServer) -> None:
    import grpc

    with FeatureClient(small_server.target) as client, pytest.raises(FeatureServiceError) as info:
        client.extract(photo("coffee"), model="resnet18", nodes="layer9")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "DescribeModel" in info.value.details


def test_cli_models_nodes_extract(
    small_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", small_server.target]
    assert cli_main([*target, "models"]) == 0
    assert "mobilenet_v2" in capsys.readouterr().out
    assert cli_main([*target, "nodes", "resnet18", "--shapes", "--filter", "layer4.1"]) == 0
    assert "layer4.1.relu_1" in capsys.readouterr().out
    img = tmp_path / "cat.jpg"
    img.write_bytes(encode(photo("chelsea")))
    out = tmp_path / "out.npz"
    code = cli_main(
        [
            *target,
            "extract",
            str(img),
            str(img),
            "--model",
            "mobilenet_v2",
            "--node",
            "features.18",
            "--pool",
            "gem",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    saved = np.load(out)
    assert saved["features.18"].shape == (2, 1280)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_layertap_serve_command_with_config_file(tmp_path: Path, resnet18_weights: Path) -> None:
    """`layertap serve --config` as users run it, stopped with SIGTERM (graceful)."""
    config = tmp_path / "layertap.toml"
    config.write_text(
        f'[server]\nmax_batch_size = 4\n\n[[models]]\nname = "r18"\narch = "resnet18"\n'
        f'weights = "{resnet18_weights.name}"\n'
    )
    (tmp_path / resnet18_weights.name).write_bytes(resnet18_weights.read_bytes())
    port = _free_port()
    env = {**os.environ, "LAYERTAP_PORT": str(port)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "layertap.client.cli",
            "serve",
            "--config",
            str(config),
            "--metrics-port",
            "0",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        with FeatureClient(f"127.0.0.1:{port}", timeout=5) as client:
            while True:
                try:
                    models = client.list_models()
                    if models and models[0].ready:
                        break
                except FeatureServiceError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, proc.stdout
                time.sleep(0.5)
            assert models[0].weights == "resnet18.pth"
            out = client.extract(photo("coffee"), model="r18", nodes="layer1", pool="max")
            assert out["layer1"].shape == (1, 64)
    finally:
        proc.terminate()
        proc.wait(60)
    assert proc.returncode == 0


def test_embedded_default_config_serves_real_and_marked_random_models() -> None:
    from conftest import start_server

    from layertap.server.settings import load_settings
    from layertap.server.sources.torchvision_models import cached_weights_path

    settings = load_settings(["--port", "0"], env={})
    running = start_server(settings)
    try:
        with FeatureClient(running.target) as client:
            models = {m.name: m for m in client.list_models()}
            assert set(models) == {"mobilenet_v2", "resnet50", "vgg16"}
            assert all(m.ready for m in models.values())
            assert models["mobilenet_v2"].weights_sha256 == MOBILENET_SHA256
            for name in ("resnet50", "vgg16"):
                import torchvision

                enum = torchvision.models.get_model_weights(name).DEFAULT
                if cached_weights_path(enum).is_file():
                    assert not models[name].random_weights
                else:
                    assert models[name].random_weights
                    assert models[name].weights_sha256 == "random"
                    assert "not cached" in models[name].status_message
            out = client.extract(
                photo("chelsea"), model="vgg16", nodes=["features.22"], pool="gem", normalize=True
            )
            assert out["features.22"].shape == (1, 512)
    finally:
        running.stop()


def test_server_info_reports_limits(small_server: RunningServer) -> None:
    s = small_server.server.settings
    with FeatureClient(small_server.target) as client:
        info = client.server_info()
    assert info.version
    assert info.max_images_per_request == s.max_images_per_request == 16
    assert info.max_image_pixels == s.max_image_pixels
    assert info.max_message_bytes == s.max_message_bytes
    assert info.max_batch_size == (s.max_batch_size or 4)  # 0: the CPU default, 4


def test_connections_are_aged_out_when_configured(resnet18_weights: Path) -> None:
    """max_connection_age_s: the server sends GOAWAY; the client reconnects transparently."""
    from conftest import start_server

    from layertap.server.app import server_options
    from layertap.server.settings import ModelConfig, Settings

    settings = Settings(
        port=0,
        metrics=False,
        max_connection_age_s=0.5,
        max_connection_age_grace_s=5,
        models=(ModelConfig(name="r18", arch="resnet18", weights=str(resnet18_weights)),),
    )
    assert ("grpc.max_connection_age_ms", 500) in server_options(settings)
    assert ("grpc.max_connection_age_grace_ms", 5000) in server_options(settings)
    assert not any("connection_age" in k for k, _ in server_options(Settings()))
    running = start_server(settings)
    # the client channel's connectivity, as gRPC reports it: READY while a connection is up;
    # a GOAWAY from the server takes it out of READY, and the next call connects again
    states: list[grpc.ChannelConnectivity] = []
    changed = threading.Condition()

    def record(state: grpc.ChannelConnectivity) -> None:
        with changed:
            states.append(state)
            changed.notify_all()

    def entries(into: bool) -> int:
        """How often the channel entered READY (a connection came up), or left it (one went)."""
        ready = [s == grpc.ChannelConnectivity.READY for s in states]
        return sum(1 for i, r in enumerate(ready) if r != (i > 0 and ready[i - 1]) and r == into)

    def wait_for(condition: Callable[[], bool], what: str) -> None:
        with changed:  # the age is 0.5 s; 60 s only bounds a hang, it is never waited out
            assert changed.wait_for(condition, timeout=60), f"{what}: states {states}"

    try:
        with FeatureClient(running.target) as client:
            client._channel.subscribe(record)  # the SDK client's own channel
            for lifetime in range(1, 4):  # spans several connection lifetimes
                out = client.extract(photo("coffee"), model="r18", nodes="layer1", pool="avg")
                assert out["layer1"].shape == (1, 64)
                wait_for(lambda n=lifetime: entries(True) >= n, f"connection {lifetime} up")
                # the server ages it out (GOAWAY): the channel leaves READY by itself (to
                # reconnect at once, or to wait idle for the next call)
                wait_for(lambda n=lifetime: entries(False) >= n, f"connection {lifetime} aged")
            out = client.extract(photo("coffee"), model="r18", nodes="layer1", pool="avg")
            assert out["layer1"].shape == (1, 64)  # transparently, on a new connection
            wait_for(lambda: entries(True) >= 4, "a fourth connection")
            client._channel.unsubscribe(record)
    finally:
        running.stop()
    assert grpc.ChannelConnectivity.TRANSIENT_FAILURE not in states, states


def test_requests_for_different_node_sets_share_one_forward(small_server: RunningServer) -> None:
    """The batch runs the union of its requests' node sets; each gets exactly its own outputs."""
    node_sets = [["layer1"], ["layer2", "layer4"], ["layer4"], ["fc", "layer1"]]
    images = [photo(n) for n in ("astronaut", "chelsea", "coffee", "rocket")]
    with FeatureClient(small_server.target) as client:  # each alone, for reference
        alone = [
            client.extract(images[i], model="resnet18", nodes=nodes, pool="avg")
            for i, nodes in enumerate(node_sets)
        ]
    batcher = small_server.server.batcher
    before = batcher.batches_run

    async def together() -> list[object]:
        async with AsyncFeatureClient(small_server.target) as client:
            calls = [
                client.extract(images[i % 4], model="resnet18", nodes=node_sets[i % 4], pool="avg")
                for i in range(16)
            ]
            return await asyncio.gather(*calls)

    results = asyncio.run(together())
    forwards = batcher.batches_run - before
    assert forwards < 16, "requests with different node sets should have shared forwards"
    assert any(r.metadata.batch_size > 1 for r in results)  # type: ignore[attr-defined]
    for i, result in enumerate(results):
        reference = alone[i % 4]
        assert list(result) == node_sets[i % 4]  # only its own keys, in its order
        for key in reference:
            np.testing.assert_allclose(result[key], reference[key], atol=1e-5)
