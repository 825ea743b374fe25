"""FeatureClient, AsyncFeatureClient and the CLI end to end against an in-process fake server.

The fake servicer speaks the real protocol over a real gRPC socket but computes nothing:
each output is derived from the input bytes so tests can check order, stacking and aliases.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from layertap.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    AsyncFeatureClient,
    FeatureClient,
    FeatureServiceError,
    ModelDescription,
    ModelInfo,
)
from layertap.client.cli import main
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

SHA = "0123456789abcdef" * 4
PREPROCESSING = pb.Preprocessing(
    resize_size=232,
    crop_size=[224, 224],
    mean=[0.485, 0.456, 0.406],
    std=[0.229, 0.224, 0.225],
    interpolation="bilinear",
    antialias=True,
)
MODEL = pb.ModelInfo(
    name="fake",
    architecture="resnet18",
    weights="IMAGENET1K_V1",
    weights_sha256=SHA,
    input_size=[224, 224],
    preprocessing=PREPROCESSING,
    device="cpu",
    ready=True,
    compute_dtype="float32",
)
NODES = [
    pb.NodeInfo(
        name="layer1.0.relu",
        shape=[1, 64, 56, 56],
        dtype="float32",
        layout="NCHW",
        op="call_module",
        target="ReLU",
    ),
    pb.NodeInfo(
        name="fc", shape=[1, 1000], dtype="float32", layout="NC", op="call_module", target="Linear"
    ),
]


def image_value(image: pb.Image) -> float:
    """A number that identifies an input image: byte count (encoded) or pixel mean (raw)."""
    if image.WhichOneof("source") == "encoded":
        return float(len(image.encoded))
    dtype = {"uint8": np.uint8, "float32": np.float32}[image.tensor.dtype]
    return float(np.frombuffer(image.tensor.data, dtype=dtype).mean())


def expected_output(value: float, node_index: int, pooled: bool = False) -> np.ndarray:
    """What the fake server returns for an image value and the node's position (bf16-exact)."""
    out = np.full((2, 3), round(value), np.float32) + np.arange(6, dtype=np.float32).reshape(2, 3)
    out += 50 * node_index
    return out.mean(axis=0) if pooled else out


def encode(array: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        return (array.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return array.astype({"float32": "<f4", "float16": "<f2"}[dtype]).tobytes()


# time_remaining() of every "slow" call as the server saw it: the deadline the client sent
SLOW_DEADLINES: list[float | None] = []


class FakeServicer(pb_grpc.FeatureServiceServicer):
    """Implements the protocol; models "bad", "slow", "corrupt", "auth" misbehave on purpose."""

    def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[MODEL])

    def DescribeModel(
        self, request: pb.DescribeModelRequest, context: Any
    ) -> pb.DescribeModelResponse:
        if request.model != "fake":
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not configured")
        return pb.DescribeModelResponse(
            model=MODEL,
            nodes=NODES,
            modules=[pb.ModuleInfo(name="", type="ResNet", own_parameters=0)],
            extraction_mode="fx",
        )

    def Extract(self, request: pb.ExtractRequest, context: Any) -> pb.ExtractResponse:
        if request.model == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model 'bad' is bad")
        if request.model == "slow":
            SLOW_DEADLINES.append(context.time_remaining())
            deadline = time.monotonic() + 5
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            return pb.ExtractResponse()
        if request.model == "auth":
            md = dict(context.invocation_metadata())
            if md.get("x-api-key") != "secret":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing x-api-key")
        nodes = list(request.nodes) + sorted(set(request.aliases) - set(request.nodes))
        pooled = request.output.pool != pb.POOLING_RAW
        dtype = request.output.dtype or "float32"
        results = []
        for image in request.images:
            value = image_value(image)
            outputs = []
            for j, node in enumerate(nodes):
                out = expected_output(value, j, pooled)
                data = encode(out, dtype)
                if request.model == "corrupt":
                    data = data[:-1]
                outputs.append(
                    pb.NamedTensor(
                        key=request.aliases.get(node, node),
                        node=f"{node}.resolved",
                        tensor=pb.Tensor(
                            dtype=dtype,
                            shape=out.shape,
                            data=data,
                            layout="NC" if pooled else "NLC",
                        ),
                    )
                )
            results.append(pb.ImageResult(outputs=outputs))
        return pb.ExtractResponse(
            results=results,
            metadata=pb.ExtractMetadata(
                model=request.model,
                weights_sha256=SHA,
                device="cpu",
                batch_size=len(request.images),
                preprocessing=PREPROCESSING,
                nodes=[
                    pb.ResolvedNode(
                        key=request.aliases.get(n, n), requested=n, node=f"{n}.resolved"
                    )
                    for n in nodes
                ],
                timings=pb.Timings(queue_ms=0.5, decode_ms=1.5, compute_ms=2.5, total_ms=4.5),
            ),
        )


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FeatureServiceServicer_to_server(FakeServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def client(target: str) -> Iterator[FeatureClient]:
    with FeatureClient(target, timeout=10) as c:
        yield c


def _png(value: int, size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = [np.full((4, 4, 3), 10, np.uint8), np.full((4, 4, 3), 20, np.uint8), b"x" * 33]


def _check_stacked(result: Any, keys: list[str], pooled: bool = False) -> None:
    values = [10.0, 20.0, 33.0]
    assert list(result) == keys
    for j, key in enumerate(keys):
        expected = np.stack([expected_output(v, j, pooled) for v in values])
        assert result[key].shape == expected.shape
        np.testing.assert_array_equal(result[key], expected)


# --------------------------------------------------------------------------- sync client


def test_list_models_and_describe(client: FeatureClient) -> None:
    (model,) = client.list_models()
    assert isinstance(model, ModelInfo)
    assert (model.name, model.weights_sha256, model.input_size) == ("fake", SHA, (224, 224))
    assert model.preprocessing.mean == (0.485, 0.456, 0.406)
    assert model.ready and not model.random_weights
    desc = client.describe("fake")
    assert isinstance(desc, ModelDescription)
    assert desc.node_names == ["layer1.0.relu", "fc"]
    assert desc.nodes[0].shape == (1, 64, 56, 56)
    assert (desc.nodes[1].layout, desc.nodes[1].target) == ("NC", "Linear")
    assert desc.modules[0].type == "ResNet"
    assert desc.extraction_mode == "fx"


def test_extract_stacks_in_request_order(client: FeatureClient) -> None:
    result = client.extract(IMAGES, model="fake", nodes=["z.node", "a.node"])
    _check_stacked(result, ["z.node", "a.node"])
    assert result.nodes == {"z.node": "z.node.resolved", "a.node": "a.node.resolved"}
    assert result.layouts == {"z.node": "NLC", "a.node": "NLC"}
    assert len(result.per_image) == 3
    np.testing.assert_array_equal(result.per_image[2]["a.node"], expected_output(33, 1))
    meta = result.metadata
    assert (meta.model, meta.weights_sha256, meta.batch_size, meta.device) == (
        "fake",
        SHA,
        3,
        "cpu",
    )
    assert [tuple(n) for n in meta.nodes] == [
        ("z.node", "z.node", "z.node.resolved"),
        ("a.node", "a.node", "a.node.resolved"),
    ]
    assert meta.timings.total_ms == 4.5
    assert meta.preprocessing.crop_size == (224, 224)


def test_extract_single_image_has_batch_axis(client: FeatureClient) -> None:
    result = client.extract(IMAGES[0], model="fake", nodes="n")
    assert result["n"].shape == (1, 2, 3)
    np.testing.assert_array_equal(result["n"][0], expected_output(10, 0))


def test_extract_aliases_pool_and_dtypes(client: FeatureClient) -> None:
    for dtype in ("float32", "float16", "bfloat16"):
        result = client.extract(
            IMAGES,
            model="fake",
            nodes={"z.node": "feat", "a.node": "logits"},
            pool="gem",
            dtype=dtype,
        )
        _check_stacked(result, ["feat", "logits"], pooled=True)
        expected_dtype = np.float16 if dtype == "float16" else np.float32
        assert result["feat"].dtype == expected_dtype
        assert result.layouts["feat"] == "NC"
        assert result.nodes["logits"] == "a.node.resolved"


def test_extract_files(client: FeatureClient, tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    data = _png(7)
    path.write_bytes(data)
    result = client.extract([path, str(path)], model="fake", nodes="n")
    np.testing.assert_array_equal(result["n"][1], expected_output(len(data), 0))


def test_server_errors_become_feature_service_error(client: FeatureClient) -> None:
    with pytest.raises(FeatureServiceError) as info:
        client.extract(IMAGES, model="bad", nodes="n")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details == "model 'bad' is bad"
    assert str(info.value) == "INVALID_ARGUMENT: model 'bad' is bad"
    with pytest.raises(FeatureServiceError) as info:
        client.describe("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_malformed_response_is_detected(client: FeatureClient) -> None:
    with pytest.raises(FeatureServiceError, match="malformed server response") as info:
        client.extract(IMAGES, model="corrupt", nodes="n")
    assert info.value.code is None


def test_bad_input_fails_before_any_rpc(target: str) -> None:
    client = FeatureClient(target)
    client.close()  # an RPC would raise RuntimeError; conversion errors come first
    with pytest.raises(ValueError, match="accepted arrays"):
        client.extract(np.zeros((4, 4), np.float64), model="fake", nodes="n")
    with pytest.raises(TypeError):
        client.extract(object(), model="fake", nodes="n")


def test_per_call_timeout_overrides_default(target: str) -> None:
    """The deadline the server receives is the call's 0.2 s, not the client's default 30 s
    (read from the server's side, so a slow runner cannot blur it)."""
    SLOW_DEADLINES.clear()
    with FeatureClient(target, timeout=30) as client:
        with pytest.raises(FeatureServiceError) as info:
            client.extract(IMAGES[0], model="slow", nodes="n", timeout=0.2)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with FeatureClient(target, timeout=0.2) as client, pytest.raises(FeatureServiceError) as info:
        client.extract(IMAGES[0], model="slow", nodes="n")
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(SLOW_DEADLINES) == 2, SLOW_DEADLINES
    # gRPC sends the timeout rounded up a little: 0.2 s arrives as ~0.2 s, never as 30
    assert all(d is not None and 0 < d < 1 for d in SLOW_DEADLINES), SLOW_DEADLINES


def test_metadata_is_sent(target: str) -> None:
    with FeatureClient(target, metadata=[("x-api-key", "secret")]) as client:
        assert list(client.extract(IMAGES[0], model="auth", nodes="n")) == ["n"]
    with FeatureClient(target) as client, pytest.raises(FeatureServiceError) as info:
        client.extract(IMAGES[0], model="auth", nodes="n")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_max_message_bytes_is_applied(target: str) -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    with FeatureClient(target, max_message_bytes=1024) as client:
        with pytest.raises(FeatureServiceError) as info:
            client.extract(b"x" * 4096, model="fake", nodes="n")
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_context_manager_closes_channel(target: str) -> None:
    with FeatureClient(target) as client:
        assert client.list_models()
    assert client.closed
    with pytest.raises(RuntimeError, match="closed"):
        client.list_models()
    with pytest.raises(ValueError, match="closed channel"):  # the grpc channel itself
        client._stub.ListModels(pb.ListModelsRequest())
    client.close()  # idempotent


def test_priority_and_native_resolution_travel(client: FeatureClient) -> None:
    sent: list[pb.ExtractRequest] = []
    real = client._stub.Extract

    def recording(request: pb.ExtractRequest, **kwargs: Any) -> Any:
        sent.append(request)
        return real(request, **kwargs)

    client._stub.Extract = recording  # type: ignore[method-assign]
    client.extract(IMAGES, model="fake", nodes="n")
    client.extract(IMAGES[0], model="fake", nodes="n", priority="low", native_resolution=True)
    assert [(r.priority, r.native_resolution) for r in sent] == [
        (pb.PRIORITY_NORMAL, False),
        (pb.PRIORITY_LOW, True),
    ]
    with pytest.raises(ValueError, match="priority"):
        client.extract(IMAGES[0], model="fake", nodes="n", priority="high")


def test_server_info_falls_back_to_list_models(client: FeatureClient) -> None:
    """This fake predates GetServerInfo (UNIMPLEMENTED): ListModels answers, limits unknown."""
    info = client.get_server_info()
    assert info.max_images_per_request == 0 and info.methods == ()
    assert client.server_info() == info


# --------------------------------------------------------------------------- async client


async def test_async_client_end_to_end(target: str) -> None:
    async with AsyncFeatureClient(target, timeout=10) as client:
        (model,) = await client.list_models()
        assert model.name == "fake"
        desc = await client.describe("fake")
        assert desc.node_names == ["layer1.0.relu", "fc"]
        result = await client.extract(IMAGES, model="fake", nodes=["z.node", "a.node"])
        _check_stacked(result, ["z.node", "a.node"])
        result = await client.extract(
            IMAGES, model="fake", nodes={"z.node": "feat"}, pool="avg", dtype="bfloat16"
        )
        _check_stacked(result, ["feat"], pooled=True)
        assert result.metadata.batch_size == 3
        channel = client._channel
        assert channel is not None
    assert client.closed
    with pytest.raises(RuntimeError, match="closed"):
        await client.list_models()
    with pytest.raises(grpc.aio.UsageError, match="closed"):  # the grpc.aio channel itself
        await channel.unary_unary("/layertap.v1.FeatureService/ListModels")(b"")


async def test_async_errors_and_timeout(target: str) -> None:
    async with AsyncFeatureClient(target, timeout=30) as client:
        with pytest.raises(FeatureServiceError) as info:
            await client.extract(IMAGES, model="bad", nodes="n")
        assert (info.value.code, info.value.details) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "model 'bad' is bad",
        )
        with pytest.raises(FeatureServiceError) as info:
            await client.extract(IMAGES[0], model="slow", nodes="n", timeout=0.2)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(FeatureServiceError, match="malformed"):
            await client.extract(IMAGES, model="corrupt", nodes="n")
        with pytest.raises(ValueError, match="unknown pool"):
            await client.extract(IMAGES, model="fake", nodes="n", pool="median")
    async with AsyncFeatureClient(target, metadata=[("x-api-key", "secret")]) as client:
        assert list(await client.extract(b"abc", model="auth", nodes="n")) == ["n"]


# --------------------------------------------------------------------------- CLI


def test_cli_models(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", target, "models"]) == 0
    out = capsys.readouterr().out
    header, row = out.strip().splitlines()
    assert header.split() == [
        "NAME",
        "ARCHITECTURE",
        "WEIGHTS",
        "SHA256",
        "INPUT",
        "DEVICE",
        "READY",
    ]
    assert row.split() == ["fake", "resnet18", "IMAGENET1K_V1", SHA[:12], "224x224", "cpu", "yes"]


def test_cli_target_from_env_and_after_subcommand(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAYERTAP_TARGET", target)
    assert main(["nodes", "fake"]) == 0
    assert capsys.readouterr().out.splitlines() == ["layer1.0.relu", "fc"]
    monkeypatch.setenv("LAYERTAP_TARGET", "127.0.0.1:1")
    assert main(["nodes", "fake", "--target", target, "--timeout", "5"]) == 0


def test_cli_nodes_shapes_filter(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", target, "nodes", "fake", "--shapes", "--filter", "relu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["NODE", "SHAPE", "DTYPE", "LAYOUT"]
    assert lines[1].split() == ["layer1.0.relu", "[1,", "64,", "56,", "56]", "float32", "NCHW"]
    assert len(lines) == 2


def test_cli_extract_writes_npz(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(_png(i * 50, size=4 + i))
        paths.append(path)
    out = tmp_path / "feats.npz"
    argv = [
        "--target",
        target,
        "extract",
        *map(str, paths),
        "--model",
        "fake",
        "--node",
        "layer1.0.relu",
        "--node",
        "fc",
        "--pool",
        "gem",
        "--gem-p",
        "4",
        "--normalize",
        "--dtype",
        "float16",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "layer1.0.relu" in printed and "[2, 3]" in printed and "float16" in printed
    with np.load(out) as npz:
        assert list(npz.keys()) == ["layer1.0.relu", "fc"]
        sizes = [len(p.read_bytes()) for p in paths]
        expected = np.stack([expected_output(s, 1, pooled=True) for s in sizes])
        np.testing.assert_array_equal(npz["fc"], expected.astype(np.float16))

    assert main(argv[:-2]) == 0  # no -o: summary only
    assert "wrote" not in capsys.readouterr().out


def test_cli_server_error(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png(1))
    assert main(["--target", target, "extract", str(path), "--model", "bad", "--node", "x"]) == 1
    assert capsys.readouterr().err.strip() == "error: INVALID_ARGUMENT: model 'bad' is bad"
    assert (
        main(
            [
                "--target",
                target,
                "extract",
                str(tmp_path / "missing.png"),
                "--model",
                "fake",
                "--node",
                "x",
            ]
        )
        == 2
    )
    assert "missing.png" in capsys.readouterr().err


def test_cli_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--target", f"127.0.0.1:{port}", "models"]) == 1
    err = capsys.readouterr().err
    assert f"server at 127.0.0.1:{port} is not reachable" in err
    assert "layertap serve" in err


def test_cli_serve_passes_arguments_through(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[list[str]] = []
    fake_app = types.ModuleType("layertap.server.app")

    def fake_main(argv: list[str]) -> int:
        calls.append(argv)
        return 0

    fake_app.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "layertap.server.app", fake_app)
    assert main(["serve", "--config", "x.toml", "--port", "1", "--help"]) == 0
    assert main(["--target", "h:1", "serve", "-v"]) == 0
    assert calls == [["--config", "x.toml", "--port", "1", "--help"], ["-v"]]

    monkeypatch.setitem(sys.modules, "layertap.server.app", None)  # import now fails
    assert main(["serve"]) == 2
    assert "pip install layertap[server]" in capsys.readouterr().err


def test_python_dash_m_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "layertap.client", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for command in ("serve", "models", "nodes", "extract"):
        assert command in proc.stdout
