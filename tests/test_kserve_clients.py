"""The real Triton clients (PyPI tritonclient[grpc,http], in a venv of their own: their stubs
and layertap's both define inference.*) against a real layertap server: metadata lists every
node, ModelInfer over gRPC and HTTP (binary tensor data and JSON) gives the same descriptor bytes
as layertap's Extract for the same photo, the raw `pixels` input works, the gRPC stream answers
each inference, and bad requests raise the protocol's statuses with layertap's messages."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import MOBILENET, RunningServer, photo, serving

from layertap.client import FeatureClient
from layertap.server.settings import Settings

SCRIPT = r"""
import base64, hashlib, json, queue, sys
import numpy as np
import tritonclient.grpc as g
import tritonclient.http as h
from tritonclient.utils import InferenceServerException

grpc_target, http_target, path = sys.argv[1:4]
jpeg = open(path, "rb").read()
pixels = np.load(path + ".npy")
NODE = "features.18"
PARAMS = {"pool": "gem", "normalize": True}
out = {}

def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

def error(call):
    try:
        call()
        return "no error"
    except InferenceServerException as e:
        return f"{e.status()} {e.message()}"

for name, m, client in (("grpc", g, g.InferenceServerClient(grpc_target)),
                        ("http", h, h.InferenceServerClient(http_target))):
    md = client.get_model_metadata("m")
    if name == "http":
        inputs, outputs = md["inputs"], md["outputs"]
    else:
        inputs = [
            {"name": i.name, "datatype": i.datatype, "shape": list(i.shape)} for i in md.inputs
        ]
        outputs = [{"name": o.name, "shape": list(o.shape)} for o in md.outputs]
    images = m.InferInput("images", [2], "BYTES")
    images.set_data_from_numpy(np.array([jpeg, jpeg], dtype=np.object_))
    res = client.infer("m", [images], outputs=[m.InferRequestedOutput(NODE)], parameters=PARAMS)
    px = m.InferInput("pixels", list(pixels.shape), "UINT8")
    px.set_data_from_numpy(pixels)
    want = [m.InferRequestedOutput(NODE)]
    pooled = client.infer("m", [px], outputs=want, parameters={"pool": "avg"})
    wrong = m.InferInput("images", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros([1], np.float32))
    junk = m.InferInput("images", [1], "BYTES")
    junk.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    out[name] = {
        "live": client.is_server_live(), "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("m"), "inputs": inputs,
        "n_outputs": len(outputs), "node": [o for o in outputs if o["name"] == NODE][0],
        "shape": list(res.as_numpy(NODE).shape), "sha256": digest(res.as_numpy(NODE)),
        "pixels_sha256": digest(pooled.as_numpy(NODE)),
        "unknown_output": error(
            lambda: client.infer("m", [images], outputs=[m.InferRequestedOutput("no.such.node")])
        ),
        "wrong_datatype": error(lambda: client.infer("m", [wrong], outputs=want)),
        "not_an_image": error(lambda: client.infer("m", [junk], outputs=want)),
        "unknown_model": error(lambda: client.get_model_metadata("nope")),
        "live_after": client.is_server_live(),
    }

# HTTP with JSON tensors both ways: BYTES elements base64 strings, outputs as JSON data
c = h.InferenceServerClient(http_target)
b64 = h.InferInput("images", [1], "BYTES")
text = np.array([base64.b64encode(jpeg).decode()], dtype=np.object_)
b64.set_data_from_numpy(text, binary_data=False)
as_json = [h.InferRequestedOutput(NODE, binary_data=False)]
res = c.infer("m", [b64], outputs=as_json, parameters=PARAMS)
out["http_json"] = res.as_numpy(NODE).astype(np.float32).tolist()

# the gRPC stream: three inferences, one of them bad
answers = queue.Queue()
c = g.InferenceServerClient(grpc_target)
c.start_stream(callback=lambda result, error: answers.put((result, error)))
one = g.InferInput("images", [1], "BYTES")
one.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
for i in range(3):
    c.async_stream_infer(
        "m", [one], outputs=[g.InferRequestedOutput(NODE)], request_id=f"r{i}", parameters=PARAMS
    )
bad = g.InferInput("images", [1], "BYTES")
bad.set_data_from_numpy(np.array([b"junk"], dtype=np.object_))
c.async_stream_infer(
    "m", [bad], outputs=[g.InferRequestedOutput(NODE)], request_id="bad", parameters=PARAMS
)
got = [answers.get(timeout=120) for _ in range(4)]
c.stop_stream()
out["stream"] = sorted(
    (r.get_response().id, list(r.as_numpy(NODE).shape)) if e is None else ("error", str(e)[:200])
    for r, e in got
)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serving(Settings(port=0, models=(MOBILENET,))) as running:
        yield running


@pytest.mark.slow
def test_tritonclient_grpc_and_http(
    tmp_path: Path, server: RunningServer, triton_python: Path
) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo("astronaut")).save(buf, "JPEG", quality=90)
    jpeg = tmp_path / "astronaut.jpg"
    jpeg.write_bytes(buf.getvalue())
    pixels = photo("chelsea")[None, :200, :240].copy()
    np.save(str(jpeg) + ".npy", pixels)
    with FeatureClient(server.target) as client:
        want = client.extract([buf.getvalue()] * 2, model="m", nodes="features.18", pool="gem",
                              normalize=True)["features.18"]  # fmt: skip
        want_pixels = client.extract([pixels[0]], model="m", nodes="features.18", pool="avg")
    http = server.http_url.removeprefix("http://")
    done = subprocess.run(
        [str(triton_python), "-c", SCRIPT, server.target, http, str(jpeg)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("grpc", "http"):
        g = got[name]
        assert (g["live"], g["ready"], g["model_ready"], g["live_after"]) == (True,) * 4, name
        assert [i["name"] for i in g["inputs"]] == ["images", "pixels", "normalized"]
        assert g["n_outputs"] > 50  # every node of mobilenet_v2
        assert [int(d) for d in g["node"]["shape"]] == [-1, 1280, 7, 7]
        assert g["shape"] == [2, 1280]
        assert g["sha256"] == hashlib.sha256(want.tobytes()).hexdigest(), name
        pixels_want = np.ascontiguousarray(want_pixels["features.18"]).tobytes()
        assert g["pixels_sha256"] == hashlib.sha256(pixels_want).hexdigest(), name
    grpc_, http_ = got["grpc"], got["http"]
    assert grpc_["unknown_output"].startswith("StatusCode.INVALID_ARGUMENT")
    assert "no.such.node" in grpc_["unknown_output"]
    assert http_["unknown_output"].startswith("400") and "no.such.node" in http_["unknown_output"]
    assert grpc_["wrong_datatype"].startswith("StatusCode.INVALID_ARGUMENT")
    assert http_["wrong_datatype"].startswith("400") and "must be BYTES" in http_["wrong_datatype"]
    assert "image 0" in grpc_["not_an_image"] and http_["not_an_image"].startswith("400")
    assert grpc_["unknown_model"].startswith("StatusCode.NOT_FOUND")
    assert http_["unknown_model"].startswith("404")
    np.testing.assert_allclose(got["http_json"], want[:1], rtol=1e-6, atol=1e-7)
    answered = [s for s in got["stream"] if s[0] != "error"]
    assert answered == [["r0", [1, 1280]], ["r1", [1, 1280]], ["r2", [1, 1280]]]
    errors = [s for s in got["stream"] if s[0] == "error"]
    assert len(errors) == 1 and "image 0" in errors[0][1]


KSERVE_SCRIPT = r"""
import asyncio, hashlib, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

grpc_target, http_url, path = sys.argv[1:4]
jpeg = open(path, "rb").read()

def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()

def request(binary):
    images = InferInput("images", [1], "BYTES")
    images.set_data_from_numpy(np.array([jpeg], dtype=np.object_), binary_data=binary)
    return InferRequest("m", [images], request_id="k1", parameters={"pool": "gem", "normalize": True},
                        request_outputs=[RequestedOutput("features.18")])

async def main():
    out = {}
    async with InferenceGRPCClient(grpc_target) as client:
        out["grpc_live"] = await client.is_server_live()
        out["grpc_model_ready"] = await client.is_model_ready("m")
        res = await client.infer(request(True))
        out["grpc"] = [res.id, res.outputs[0].name, digest(res.outputs[0].as_numpy())]
    rest = InferenceRESTClient(RESTConfig(protocol="v2"))
    out["rest_live"] = await rest.is_server_live(http_url)
    out["rest_model_ready"] = await rest.is_model_ready(http_url, "m")
    res = await rest.infer(http_url, request(True), model_name="m")
    out["rest"] = [res.id, res.outputs[0].name, digest(res.outputs[0].as_numpy())]
    await rest.close()
    print(json.dumps(out))

asyncio.run(main())
"""  # noqa: E501


@pytest.fixture(scope="module")
def kserve_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KServe's own Python clients (PyPI kserve), in a venv of their own (their generated
    stubs define inference.* like tritonclient's)."""
    import venv

    env_dir = tmp_path_factory.mktemp("kserve") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "kserve"], check=True, timeout=900)
    return python


@pytest.mark.slow
def test_kserve_clients(tmp_path: Path, server: RunningServer, kserve_python: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo("astronaut")).save(buf, "JPEG", quality=90)
    jpeg = tmp_path / "astronaut.jpg"
    jpeg.write_bytes(buf.getvalue())
    with FeatureClient(server.target) as client:
        want = client.extract(buf.getvalue(), model="m", nodes="features.18", pool="gem",
                              normalize=True)["features.18"]  # fmt: skip
    digest = hashlib.sha256(np.ascontiguousarray(want).tobytes()).hexdigest()
    done = subprocess.run(
        [str(kserve_python), "-c", KSERVE_SCRIPT, server.target, server.http_url, str(jpeg)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["grpc_live"] and got["grpc_model_ready"]
    assert got["rest_live"] and got["rest_model_ready"]
    assert got["grpc"] == ["k1", "features.18", digest]
    assert got["rest"] == ["k1", "features.18", digest]
