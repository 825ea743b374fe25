"""KServe v2 / Open Inference Protocol over gRPC from Node.js (@grpc/grpc-js, @grpc/proto-loader),
built from the protocol's PUBLISHED .proto, not layertap's own: kserve's grpc_predict_v2.proto,
taken from the kserve wheel on PyPI at test time. kserve 0.15.2 is pinned: the last release
whose wheel ships the .proto (from 0.16 on only its generated stubs are packaged).

tests/node/kserve_infer.js calls ServerLive, ServerReady, ModelMetadata and ModelInfer (a raw
BYTES input, pool=gem and normalize=true as request parameters); its float32 bytes must be the
Python SDK's, exactly. Node and its modules come from `make tools`; missing is a failure.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, photo, start_server
from test_operations_tools import NODE_DIR, ROOT, TOOL_TIMEOUT, _node

from layertap.client import FeatureClient
from layertap.server.settings import ModelConfig, Settings

KSERVE = "kserve==0.15.2"
PROTO_IN_WHEEL = "kserve/protocol/grpc/grpc_predict_v2.proto"
SCRIPT = NODE_DIR / "kserve_infer.js"
NODE = "features.18"


@pytest.fixture(scope="module")
def kserve_proto(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published grpc_predict_v2.proto, from the kserve wheel on PyPI."""
    where = tmp_path_factory.mktemp("kserve")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", KSERVE, "--no-deps", "-q", "-d", str(where)],
        check=True,
        timeout=300,
    )
    (wheel,) = where.glob("kserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert PROTO_IN_WHEEL in archive.namelist(), f"{wheel.name} has no {PROTO_IN_WHEEL}"
        proto = where / "grpc_predict_v2.proto"
        proto.write_bytes(archive.read(PROTO_IN_WHEEL))
    text = proto.read_text()
    assert "package inference;" in text and "service GRPCInferenceService" in text
    return proto


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    cfg = ModelConfig(name="m", arch="mobilenet_v2", weights="IMAGENET1K_V1")
    running = start_server(Settings(port=0, metrics=False, http=False, models=(cfg,)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "astronaut.jpg"
    path.write_bytes(encode(photo("astronaut"), quality=90))
    return path


def run_kserve_node(proto: Path, target: str, image: Path, output: str) -> tuple[int, Any]:
    """Run kserve_infer.js; its exit status and its last stdout line as JSON."""
    done = subprocess.run(
        [_node(), str(SCRIPT), str(proto), target, "m", str(image), output],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
        cwd=ROOT,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"node printed nothing (exit {done.returncode}): {done.stderr[-3000:]}"
    return done.returncode, json.loads(lines[-1])


def test_node_model_infer_matches_python_client(
    kserve_proto: Path, server: RunningServer, jpeg: Path
) -> None:
    with FeatureClient(server.target) as client:
        want = client.extract(
            [jpeg.read_bytes()], model="m", nodes=NODE, pool="gem", normalize=True
        )[NODE]
    code, got = run_kserve_node(kserve_proto, server.target, jpeg, NODE)
    assert code == 0, got
    assert (got["live"], got["ready"]) == (True, True)
    assert got["inputs"][0] == ["images", "BYTES", [-1]]
    assert [i[0] for i in got["inputs"]] == ["images", "pixels", "normalized"]
    assert got["outputs"] > 50  # every node of mobilenet_v2
    assert (got["id"], got["model_name"], got["name"]) == ("node-kserve", "m", NODE)
    assert (got["datatype"], got["shape"]) == ("FP32", [1, 1280])
    assert want.dtype == np.float32 and want.shape == (1, 1280)
    raw = base64.b64decode(got["raw_b64"])
    assert raw == want.tobytes()  # the same float32 bytes, not merely close
    assert abs(got["norm"] - 1.0) < 1e-5


def test_node_unknown_output_is_invalid_argument(
    kserve_proto: Path, server: RunningServer, jpeg: Path
) -> None:
    code, err = run_kserve_node(kserve_proto, server.target, jpeg, "no.such.node")
    assert code == 1, err
    assert err["error_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] == 3
    assert "no.such.node" in err["details"]
