"""The HTTP/REST API through the real `curl` binary: every KServe v2 REST endpoint (JSON and the
binary tensor data extension) and layertap's /v1 API on one server with mobilenet_v2's real
weights, each answer compared with the Python SDK's float32 bytes; bad requests, each with its
precise status and a message naming the problem, after which the server is still live; bearer
tokens (401, 403, 200) and the open health probes. A missing curl is a failure, never a skip.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RunningServer, encode, photo, probe_config, start_server

from layertap.client import FeatureClient
from layertap.server.settings import ModelConfig, Settings

MiB = 1024 * 1024
NODE = "features.18"
HEADER_LENGTH = "inference-header-content-length"
TOKEN = "tok-right"
MAX_MESSAGE_BYTES = 3 * MiB
MAX_IMAGES = 2
OPTIONS: dict[str, Any] = {"pool": "gem", "normalize": True}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # the final response's, names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.fail("curl is not installed; these tests need the real curl binary")
    return path


def curl(url: str, *args: str, data: bytes | None = None, token: str | None = None) -> Reply:
    """One curl call: `args` go before the URL; `data` is the request body, sent as is."""
    with tempfile.TemporaryDirectory() as tmp:
        head, body = Path(tmp) / "head", Path(tmp) / "body"
        command = [_curl(), "-sS", "-D", str(head), "-o", str(body), "-w", "%{http_code}", *args]
        if data is not None:
            command += ["--data-binary", "@-"]
        if token is not None:
            command += ["-H", f"Authorization: Bearer {token}"]
        done = subprocess.run(
            [*command, url], input=data, capture_output=True, timeout=120, check=False
        )
        assert done.returncode == 0, f"curl failed: {done.stderr.decode(errors='replace')}"
        blocks = head.read_text(errors="replace").strip().split("\r\n\r\n")
        headers = {}
        for line in blocks[-1].splitlines()[1:]:  # the last block: after any 100 Continue
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Reply(int(done.stdout), headers, body.read_bytes())


def post_json(url: str, payload: object, token: str | None = None) -> Reply:
    data = json.dumps(payload).encode()
    return curl(url, "-H", "Content-Type: application/json", data=data, token=token)


def post_binary(url: str, header: object, binary: bytes) -> Reply:
    """A v2 request with the binary tensor data extension: the JSON header, then the data."""
    head = json.dumps(header).encode()
    return curl(
        url,
        "-H",
        "Content-Type: application/octet-stream",
        "-H",
        f"Inference-Header-Content-Length: {len(head)}",
        data=head + binary,
    )


def split_binary(reply: Reply) -> tuple[dict[str, Any], bytes]:
    """A binary v2 answer: its JSON header and the bytes after it."""
    assert reply.status == 200, reply.body[:500]
    assert reply.headers["content-type"].startswith("application/octet-stream")
    length = int(reply.headers[HEADER_LENGTH])
    return json.loads(reply.body[:length]), reply.body[length:]


def length_prefixed(*elements: bytes) -> bytes:
    """A BYTES tensor's raw form: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def images_input(*elements: bytes, shape: list[int] | None = None) -> dict[str, Any]:
    data = [b64(e) for e in elements]
    return {"name": "images", "datatype": "BYTES", "shape": shape or [len(data)], "data": data}


def infer_body(
    tensor: dict[str, Any], outputs: tuple[str, ...] = (NODE,), **parameters: Any
) -> dict[str, Any]:
    return {
        "inputs": [tensor],
        "outputs": [{"name": name} for name in outputs],
        "parameters": parameters or dict(OPTIONS),
    }


def assert_live(url: str) -> None:
    live = curl(f"{url}/v2/health/live")
    assert (live.status, live.json()) == (200, {"live": True})


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """mobilenet_v2 with real weights, HTTP on, and low limits for the 413s."""
    cfg = ModelConfig(name="m", arch="mobilenet_v2", weights="IMAGENET1K_V1")
    settings = Settings(
        port=0,
        metrics=False,
        models=(cfg,),
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_parameter_bytes=MiB,
        max_images_per_request=MAX_IMAGES,
    )
    running = start_server(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def url(server: RunningServer) -> str:
    return server.http_url


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return encode(photo("astronaut"), quality=90)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """A non-square RGB crop, so a height/width mix-up shows."""
    return np.ascontiguousarray(photo("astronaut")[40:340, 60:460])


@pytest.fixture(scope="module")
def want(server: RunningServer, jpeg: bytes, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The SDK's GeM + L2 descriptors over gRPC: the reference bytes for every HTTP answer."""
    with FeatureClient(server.target) as client:
        return {
            "jpeg": client.extract([jpeg], model="m", nodes=NODE, **OPTIONS)[NODE],
            "pixels": client.extract([pixels], model="m", nodes=NODE, **OPTIONS)[NODE],
        }


# --- KServe v2: metadata and health ------------------------------------------------------------
def test_v2_server_metadata_and_health(url: str) -> None:
    meta = curl(f"{url}/v2")
    assert meta.status == 200 and meta.headers["content-type"].startswith("application/json")
    assert meta.json()["name"] == "layertap"
    assert "binary_tensor_data" in meta.json()["extensions"]
    assert_live(url)
    ready = curl(f"{url}/v2/health/ready")
    assert (ready.status, ready.json()) == (200, {"ready": True})


@pytest.mark.parametrize("prefix", ["/v2/models/m", "/v2/models/m/versions/1"])
def test_v2_model_metadata_and_ready(url: str, prefix: str) -> None:
    meta = curl(f"{url}{prefix}")
    assert meta.status == 200, meta.body[:300]
    body = meta.json()
    assert (body["name"], body["versions"]) == ("m", ["1"])
    assert [(i["name"], i["datatype"], i["shape"]) for i in body["inputs"]] == [
        ("images", "BYTES", [-1]),
        ("pixels", "UINT8", [-1, -1, -1, 3]),
        ("normalized", "FP32", [-1, 3, -1, -1]),
    ]
    outputs = {o["name"]: o for o in body["outputs"]}
    assert len(outputs) > 50  # every node of mobilenet_v2
    assert outputs[NODE]["datatype"] == "FP32" and outputs[NODE]["shape"][0] == -1
    ready = curl(f"{url}{prefix}/ready")
    assert (ready.status, ready.json()) == (200, {"name": "m", "ready": True})


# --- KServe v2: inference ----------------------------------------------------------------------
@pytest.mark.parametrize("form", ["string", "b64-object"])
def test_v2_infer_json_matches_sdk(
    url: str, jpeg: bytes, want: dict[str, np.ndarray], form: str
) -> None:
    tensor = images_input(jpeg)
    if form == "b64-object":
        tensor["data"] = [{"b64": b64(jpeg)}]
    reply = post_json(f"{url}/v2/models/m/infer", {"id": "curl-1", **infer_body(tensor)})
    assert reply.status == 200, reply.body[:500]
    assert reply.headers.get("x-request-id")
    body = reply.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("m", "1", "curl-1")
    (out,) = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == (NODE, "FP32", [1, 1280])
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    assert got.tobytes() == want["jpeg"].tobytes()  # JSON numbers carry float32 exactly


def test_v2_infer_binary_images_matches_sdk(
    url: str, jpeg: bytes, want: dict[str, np.ndarray]
) -> None:
    raw = length_prefixed(jpeg)
    header = {
        "inputs": [
            {
                "name": "images",
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": NODE}],
        "parameters": {**OPTIONS, "binary_data_output": True},
    }
    head, data = split_binary(post_binary(f"{url}/v2/models/m/infer", header, raw))
    (out,) = head["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == (NODE, "FP32", [1, 1280])
    assert out["parameters"] == {"binary_data_size": 1280 * 4} and "data" not in out
    assert data == want["jpeg"].tobytes()


def test_v2_infer_binary_pixels_matches_sdk(
    url: str, pixels: np.ndarray, want: dict[str, np.ndarray]
) -> None:
    raw = pixels.tobytes()
    header = {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": [1, *pixels.shape],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": NODE, "parameters": {"binary_data": True}}],  # per output
        "parameters": OPTIONS,
    }
    head, data = split_binary(post_binary(f"{url}/v2/models/m/infer", header, raw))
    (out,) = head["outputs"]
    assert (out["name"], out["shape"], out["parameters"]) == (
        NODE,
        [1, 1280],
        {"binary_data_size": 1280 * 4},
    )
    assert data == want["pixels"].tobytes()
    assert data != want["jpeg"].tobytes()  # the pixels were used, not some other image


# --- layertap's /v1 ----------------------------------------------------------------------------
def test_v1_models_and_describe(url: str) -> None:
    listed = curl(f"{url}/v1/models")
    assert listed.status == 200
    (model,) = listed.json()["models"]
    assert (model["name"], model["architecture"]) == ("m", "mobilenet_v2")
    described = curl(f"{url}/v1/models/m")
    assert described.status == 200
    assert NODE in json.dumps(described.json())
    assert described.json()["model"]["name"] == "m"


def _v1_descriptor(reply: Reply) -> np.ndarray:
    assert reply.status == 200, reply.body[:500]
    body = reply.json()
    assert body["model"] == "m" and "total_ms" in body["timings"]
    (result,) = body["results"]
    out = result[NODE]
    assert (out["node"], out["dtype"], out["shape"]) == (NODE, "float32", [1280])
    return np.asarray(out["data"], dtype=np.float32)


def test_v1_extract_multipart_matches_sdk(
    url: str, jpeg: bytes, want: dict[str, np.ndarray], tmp_path: Path
) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg)
    query = f"model=m&nodes={NODE}&pool=gem&normalize=true"
    reply = curl(f"{url}/v1/extract?{query}", "-F", f"image=@{image}")
    assert _v1_descriptor(reply).tobytes() == want["jpeg"][0].tobytes()


def test_v1_extract_json_matches_sdk(url: str, jpeg: bytes, want: dict[str, np.ndarray]) -> None:
    payload = {"model": "m", "nodes": [NODE], "images": [b64(jpeg)], **OPTIONS}
    reply = post_json(f"{url}/v1/extract", payload)
    assert _v1_descriptor(reply).tobytes() == want["jpeg"][0].tobytes()


# --- bad requests ------------------------------------------------------------------------------
Request = Callable[[str, bytes], Reply]


def _json_to(path: str, payload: Callable[[bytes], object]) -> Request:
    return lambda url, jpeg: post_json(f"{url}{path}", payload(jpeg))


def _binary(
    tensor: dict[str, Any], data: Callable[[bytes], bytes], size: int | None = None
) -> Request:
    def send(url: str, jpeg: bytes) -> Reply:
        raw = data(jpeg)
        entry = {**tensor, "parameters": {"binary_data_size": len(raw) if size is None else size}}
        header = {"inputs": [entry], "outputs": [{"name": NODE}]}
        return post_binary(f"{url}/v2/models/m/infer", header, raw)

    return send


INFER = "/v2/models/m/infer"
PIXELS_4X4 = {"name": "pixels", "datatype": "UINT8", "shape": [1, 4, 4, 3]}
# (id, request, status, fragments the error message must hold)
BAD: list[tuple[str, Request, int, tuple[str, ...]]] = [
    (
        "images-as-fp32",
        _json_to(INFER, lambda j: infer_body({**images_input(j), "datatype": "FP32"})),
        400,
        ("'images' must be BYTES", "'FP32'"),
    ),
    (
        "pixels-shape-vs-binary-size",
        _binary(PIXELS_4X4, lambda j: bytes(2 * 2 * 3)),
        400,
        ("'pixels'", "[1, 4, 4, 3]", "needs 48 bytes", "got 12"),
    ),
    (
        "binary-data-size-vs-body",
        _binary(PIXELS_4X4, lambda j: bytes(48), size=50),
        400,
        ("binary_data_size 50", "48 bytes"),
    ),
    (
        "bytes-count-vs-shape-json",
        _json_to(INFER, lambda j: infer_body(images_input(j, shape=[2]))),
        400,
        ("'images'", "shape [2]", "1 element"),
    ),
    (
        "bytes-count-vs-shape-raw",
        _binary(
            {"name": "images", "datatype": "BYTES", "shape": [1]}, lambda j: length_prefixed(j, j)
        ),
        400,
        ("'images'", "shape [1]", "2 element"),
    ),
    (
        "bytes-length-past-the-end",
        _binary(
            {"name": "images", "datatype": "BYTES", "shape": [1]},
            lambda j: struct.pack("<I", len(j) + 10) + j,
        ),
        400,
        ("'images'", "a BYTES element says", "remain"),
    ),
    (
        "unknown-output-node",
        _json_to(INFER, lambda j: infer_body(images_input(j), outputs=("no.such.node",))),
        400,
        ("no.such.node",),
    ),
    (
        "bytes-element-not-an-image",
        _json_to(INFER, lambda j: infer_body(images_input(b"plain text, not a photo"))),
        400,
        ("image 0", "unrecognised image format"),
    ),
    (
        "bytes-element-not-base64",
        _json_to(INFER, lambda j: infer_body({**images_input(j), "data": ["*not base64*"]})),
        400,
        ("not valid base64",),
    ),
    (
        "unknown-model",
        _json_to("/v2/models/nope/infer", lambda j: infer_body(images_input(j))),
        404,
        ("'nope'", "not served"),
    ),
    (
        "unknown-parameter",
        _json_to(INFER, lambda j: infer_body(images_input(j), pool="gem", frobnicate=1)),
        400,
        ("unknown parameter", "frobnicate"),
    ),
    (
        "bad-parameter-type",
        _json_to(INFER, lambda j: infer_body(images_input(j), normalize="yes")),
        400,
        ("'normalize'", "bool"),
    ),
    (
        "body-not-json",
        lambda url, j: curl(f"{url}{INFER}", data=b"this is {not json"),
        400,
        ("not JSON",),
    ),
    (
        "too-many-images",
        _json_to(INFER, lambda j: infer_body(images_input(*[j] * (MAX_IMAGES + 1)))),
        413,
        (f"{MAX_IMAGES + 1} images", f"max_images_per_request={MAX_IMAGES}"),
    ),
    (
        "body-over-max-message-bytes",
        lambda url, j: curl(f"{url}{INFER}", data=b" " * (MAX_MESSAGE_BYTES + 1)),
        413,
        (f"over {MAX_MESSAGE_BYTES} bytes", "max_message_bytes"),
    ),
    (
        "v1-body-over-max-message-bytes",
        lambda url, j: curl(
            f"{url}/v1/extract", "-H", "Content-Type: application/json", data=b" " * 4 * MiB
        ),
        413,
        ("max_message_bytes",),
    ),
    (
        "v1-bad-flag",
        lambda url, j: curl(f"{url}/v1/extract?model=m&nodes={NODE}&normalize=maybe", data=b""),
        400,
        ("'normalize'", "true or false", "'maybe'"),
    ),
    (
        "v1-unknown-model",
        _json_to("/v1/extract", lambda j: {"model": "nope", "nodes": NODE, "images": [b64(j)]}),
        404,
        ("'nope'", "not served"),
    ),
    (
        "v2-unknown-model-metadata",
        lambda url, j: curl(f"{url}/v2/models/nope"),
        404,
        ("'nope'",),
    ),
    (
        "unknown-path",
        lambda url, j: curl(f"{url}/v3/no/such/path"),
        404,
        ("404 Not Found", "/v3/no/such/path"),
    ),
]


@pytest.mark.parametrize(
    ("request_of", "status", "fragments"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD],
)
def test_bad_request_is_refused_precisely(
    url: str, jpeg: bytes, request_of: Request, status: int, fragments: tuple[str, ...]
) -> None:
    reply = request_of(url, jpeg)
    assert reply.status == status, reply.body[:500]
    assert reply.headers["content-type"].startswith("application/json")
    message = reply.json()["error"]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert_live(url)


@pytest.mark.parametrize("path", [INFER, "/v1/extract"])
def test_deeply_nested_json_is_invalid_not_internal(url: str, path: str) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    reply = curl(f"{url}{path}", "-H", "Content-Type: application/json", data=nested)
    assert_live(url)
    assert reply.status == 400, reply.body[:300]  # json.loads' RecursionError, not INTERNAL
    assert "not JSON" in reply.json()["error"] or "neither a form nor JSON" in reply.json()["error"]


# --- bearer tokens -----------------------------------------------------------------------------
def _guarded(**overrides: Any) -> RunningServer:
    """A small random-init probe model ("p") behind the bearer token TOKEN."""
    model = probe_config("p", 32)
    return start_server(
        Settings(port=0, metrics=False, models=(model,), auth_tokens=TOKEN, **overrides)
    )


@pytest.fixture(scope="module")
def guarded() -> Iterator[RunningServer]:
    running = _guarded()
    yield running
    running.stop()


def test_infer_needs_the_bearer_token(guarded: RunningServer, jpeg: bytes) -> None:
    url = f"{guarded.http_url}/v2/models/p/infer"
    body = infer_body(images_input(jpeg), outputs=("mean",), pool="avg")
    missing = post_json(url, body)
    assert missing.status == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "Bearer" in missing.json()["error"]
    wrong = post_json(url, body, token="tok-wrong")
    assert wrong.status == 403 and "not accepted" in wrong.json()["error"]
    right = post_json(url, body, token=TOKEN)
    assert right.status == 200, right.body[:300]
    (out,) = right.json()["outputs"]
    assert (out["name"], out["shape"]) == ("mean", [1, 4])
    assert curl(f"{guarded.http_url}/v2").status == 401  # only the probes are open
    assert curl(f"{guarded.http_url}/v1/models").status == 401


def test_health_is_open_with_auth_open_health(guarded: RunningServer) -> None:
    assert Settings().auth_open_health is True  # the default
    assert_live(guarded.http_url)
    ready = curl(f"{guarded.http_url}/v2/health/ready")
    assert (ready.status, ready.json()) == (200, {"ready": True})


def test_health_needs_the_token_without_auth_open_health() -> None:
    running = _guarded(auth_open_health=False)
    try:
        live = f"{running.http_url}/v2/health/live"
        assert curl(live).status == 401
        assert curl(live, token="tok-wrong").status == 403
        assert curl(live, token=TOKEN).json() == {"live": True}
    finally:
        running.stop()
