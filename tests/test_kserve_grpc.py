"""KServe v2 / Open Inference Protocol over gRPC, called by the real tritonclient (PyPI, in a
venv of its own: its stubs and layertap's both define inference.*): live, ready, model
metadata listing the nodes, and ModelInfer giving, for the same photo, the same descriptor
bytes as Extract; a bad output name is INVALID_ARGUMENT with layertap's message."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningServer, photo, start_server

from layertap.client import FeatureClient
from layertap.server.settings import ModelConfig, Settings

SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
jpeg = open(sys.argv[2], "rb").read()
md = c.get_model_metadata("m")
inp = g.InferInput("images", [2], "BYTES")
inp.set_data_from_numpy(np.array([jpeg, jpeg], dtype=np.object_))
res = c.infer("m", [inp], outputs=[g.InferRequestedOutput("features.18")], parameters={"pool": "gem"})
out = res.as_numpy("features.18")
try:
    c.infer("m", [inp], outputs=[g.InferRequestedOutput("no.such.node")])
    bad = "no error"
except g.InferenceServerException as e:
    bad = f"{e.status()} {e.message()}"
print(json.dumps({
    "live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready("m"),
    "inputs": [[i.name, i.datatype, list(i.shape)] for i in md.inputs],
    "outputs": [o.name for o in md.outputs],
    "shape": list(out.shape), "dtype": str(out.dtype),
    "sha256": hashlib.sha256(out.tobytes()).hexdigest(), "bad": bad,
}))
"""


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    cfg = ModelConfig(name="m", arch="mobilenet_v2", weights="IMAGENET1K_V1")
    running = start_server(Settings(port=0, models=(cfg,)))
    yield running
    running.stop()


@pytest.mark.slow
def test_tritonclient_grpc(tmp_path: Path, server: RunningServer) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo("astronaut")).save(buf, "JPEG", quality=90)
    jpeg = tmp_path / "astronaut.jpg"
    jpeg.write_bytes(buf.getvalue())
    with FeatureClient(server.target) as client:
        want = client.extract([buf.getvalue()] * 2, model="m", nodes="features.18", pool="gem")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "tritonclient[grpc]"], check=True, timeout=900
    )
    out = subprocess.run(
        [str(python), "-c", SCRIPT, server.target, str(jpeg)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert (got["live"], got["ready"], got["model_ready"]) == (True, True, True)
    assert got["inputs"] == [["images", "BYTES", [-1]]]
    assert "features.18" in got["outputs"] and len(got["outputs"]) > 50  # every node
    assert got["shape"] == [2, 1280] and got["dtype"] == "float32"
    assert got["sha256"] == hashlib.sha256(want["features.18"].tobytes()).hexdigest()
    assert got["bad"].startswith("StatusCode.INVALID_ARGUMENT") and "no.such.node" in got["bad"]
