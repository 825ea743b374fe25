"""The KServe v2 / Open Inference Protocol REST endpoints, with Triton's binary tensor data
extension (what tritonclient.http sends by default):

  GET  /v2                                   server metadata
  GET  /v2/health/live | /v2/health/ready    200, or 503 while no model is ready
  GET  /v2/models/{m}[/versions/1]           model metadata: inputs, and every node as output
  GET  /v2/models/{m}[/versions/1]/ready     200, or 503 while loading
  POST /v2/models/{m}[/versions/1]/infer     JSON tensors, or a JSON header of
                                             `Inference-Header-Content-Length` bytes followed
                                             by the inputs' binary data

An inference is a layertap Extract (kserve_tensors.py converts). In JSON, a BYTES element is the
image base64-encoded (a string, or {"b64": "..."}); outputs come as JSON `data` unless the
request asks for binary (`binary_data_output` parameter, or an output's `binary_data`). The JSON
body, base64 and the output lists are handled in the decode pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from .batching import set_request_deadline
from .errors import InvalidArgument, LimitExceeded, ModelNotFound
from .http_server import HttpCall, HttpGate, json_body
from .kserve_grpc import EXTENSIONS
from .kserve_tensors import (
    V2Input,
    V2Output,
    check_count,
    extract_request,
    images_of,
    model_metadata,
    outputs_of,
)
from .metrics import layertap_version
from .rpc import rpc

if TYPE_CHECKING:
    from layertap.v1 import layertap_pb2 as pb

    from .service import FeatureService

HEADER_LENGTH = "Inference-Header-Content-Length"
BODY_TIMEOUT_S = 30.0
NUMPY = {"FP32": "<f4", "FP16": "<f2", "INT8": "i1", "UINT8": "u1"}


@dataclass
class Reply:
    """What an endpoint answers: a body, its status and content type, extra headers."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    headers: dict[str, str] | None = None


@dataclass
class InferCall:
    model: str  # read by @rpc for the metrics' model label
    version: str
    body: bytes
    header_length: str | None
    max_images: int = 0  # max_images_per_request


@dataclass
class Parsed:
    id: str
    images: list[pb.Image]
    outputs: list[str]
    binary: dict[str, bool]  # output name -> wants binary data
    binary_default: bool
    parameters: dict[str, object]


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _element(value: object) -> bytes:
    """One BYTES element given in JSON: the image base64-encoded (a string or {"b64": ...})."""
    if isinstance(value, dict) and isinstance(value.get("b64"), str):
        value = value["b64"]
    if not isinstance(value, str):
        raise InvalidArgument("a BYTES element in JSON must be the image base64-encoded (a string)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(
            "a BYTES element is not valid base64; send images base64-encoded in JSON, or as "
            "binary data (the binary tensor data extension)"
        ) from None


def _flat(data: object, name: str) -> list[Any]:
    """A JSON `data` array, nested (row-major) or flat, as a flat list."""
    if not isinstance(data, list):
        raise InvalidArgument(f"input {name!r}: 'data' must be a JSON array")
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def parse_infer(call: InferCall) -> Parsed:
    """The request body (JSON, or JSON header + binary data) as images, outputs and parameters;
    runs in the decode pool."""
    body = call.body
    binary = b""
    if call.header_length is not None:
        try:
            length = int(call.header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} is {call.header_length[:20]!r}; it must be the JSON header's "
                f"size, 0..{len(body)}"
            )
        body, binary = body[:length], body[length:]
    try:
        header = _object(json.loads(body), "the request body")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"the request body is not JSON: {exc}") from None
    parameters = _object(header.get("parameters", {}), "'parameters'")
    binary_default = parameters.pop("binary_data_output", False) is True
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise InvalidArgument("'inputs' must be a list of one input: images, pixels or normalized")
    entry = _object(inputs[0], "an input")
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidArgument("an input needs 'name' and 'datatype' strings")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise InvalidArgument(f"input {name[:80]!r}: 'shape' must be a list of integers")
    tensor = V2Input(name, datatype, shape)
    check_count(tensor, call.max_images)  # before any element is decoded
    size = _object(entry.get("parameters", {}), "an input's 'parameters'").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise InvalidArgument(
                f"input {name[:80]!r}: binary_data_size {size!r} does not match the "
                f"{len(binary)} bytes after the JSON header"
            )
        tensor.raw = binary
    else:
        if binary:
            raise InvalidArgument(
                f"{len(binary)} bytes of binary data follow the JSON header but the input has "
                "no binary_data_size"
            )
        values = _flat(entry.get("data"), name)
        if datatype == "BYTES" and len(values) != (shape[0] if shape else 0):
            raise InvalidArgument(
                f"input {name[:80]!r} has shape {shape[:4]} but holds {len(values)} element(s)"
            )
        tensor.elements = [_element(v) for v in values] if datatype == "BYTES" else values
    outputs, wants = [], {}
    for out in header.get("outputs") or []:
        out = _object(out, "an output")
        if not isinstance(out.get("name"), str):
            raise InvalidArgument("an output needs a 'name': a node of the model")
        options = _object(out.get("parameters", {}), "an output's 'parameters'")
        if set(options) - {"binary_data", "classification"} or options.get("classification"):
            raise InvalidArgument(
                f"output {out['name'][:80]!r}: only the parameter binary_data is served; output "
                "options go in the request's parameters (pool, normalize, ...)"
            )
        outputs.append(out["name"])
        wants[out["name"]] = options.get("binary_data", binary_default) is True
    request_id = header.get("id", "")
    return Parsed(
        request_id if isinstance(request_id, str) else str(request_id)[:200],
        images_of(tensor),
        outputs,
        wants,
        binary_default,
        parameters,
    )


def _values(out: V2Output) -> list[Any]:
    if out.datatype == "BF16":  # bfloat16: the high half of a float32
        wide = np.frombuffer(out.data, "<u2").astype("<u4") << 16
        return wide.view("<f4").tolist()
    return np.frombuffer(out.data, NUMPY.get(out.datatype, "<f4")).tolist()


def encode_infer(model: str, parsed: Parsed, outputs: list[V2Output]) -> Reply:
    """The v2 response: JSON data, or a JSON header + binary data where asked; in the pool."""
    entries, blobs = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if parsed.binary.get(out.name, parsed.binary_default):
            entry["parameters"] = {"binary_data_size": len(out.data)}
            blobs.append(out.data)
        else:
            entry["data"] = _values(out)
        entries.append(entry)
    header = json_body(
        {"model_name": model, "model_version": "1", "id": parsed.id, "outputs": entries}
    )
    if not blobs:
        return Reply(header)
    return Reply(
        b"".join([header, *blobs]),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


class V2Http:
    """The endpoints' `@rpc` methods (request ids, statuses, logs, metrics as `http:<Method>`)."""

    def __init__(self, features: FeatureService) -> None:
        self.features = features
        self.runtime = features.runtime
        self.metrics = features.metrics

    def identify(self, context: HttpCall) -> object:
        return self.features.identify(context)  # type: ignore[arg-type]

    def _model(self, name: str, version: str, context: HttpCall) -> Any:
        self.features._allow(name, self.features._visible(context))  # type: ignore[arg-type]
        if version not in ("", "1"):
            raise ModelNotFound(f"model {name!r} has one version, '1' (asked for {version[:20]!r})")
        return self.runtime.model(name)

    @rpc
    async def ServerMetadata(self, _: object, context: HttpCall) -> Reply:
        meta = {"name": "layertap", "version": layertap_version(), "extensions": list(EXTENSIONS)}
        return Reply(json_body(meta))

    @rpc
    async def ServerLive(self, _: object, context: HttpCall) -> Reply:
        return Reply(json_body({"live": True}))

    @rpc
    async def ServerReady(self, _: object, context: HttpCall) -> Reply:
        ready = bool(self.runtime.ready_models())
        return Reply(json_body({"ready": ready}), 200 if ready else 503)

    @rpc
    async def ModelReady(self, match: dict[str, str], context: HttpCall) -> Reply:
        self.features._allow(match["model"], self.features._visible(context))  # type: ignore[arg-type]
        ready = self.runtime.status(match["model"]).ready and match.get("version", "1") == "1"
        return Reply(json_body({"name": match["model"], "ready": ready}), 200 if ready else 503)

    @rpc
    async def ModelMetadata(self, match: dict[str, str], context: HttpCall) -> Reply:
        loaded = self._model(match["model"], match.get("version", ""), context)
        return Reply(json_body(model_metadata(match["model"], loaded.catalog.nodes)))

    @rpc
    async def ModelInfer(self, call: InferCall, context: HttpCall) -> Reply:
        set_request_deadline(None)
        visible = self.features._visible(context)  # type: ignore[arg-type]
        self._model(call.model, call.version, context)
        call.body = await read_body(context.request)  # after the token check and admission
        call.max_images = self.features.settings.max_images_per_request
        pool = self.features.pipeline.in_pool
        parsed: Parsed = await pool(parse_infer, call)
        extract = extract_request(call.model, parsed.images, parsed.outputs, parsed.parameters)
        answer = await self.features._extract(extract, visible)
        return await pool(encode_infer, call.model, parsed, outputs_of(answer))


async def read_body(request: web.Request) -> bytes:
    """The whole body, at most client_max_size (max_message_bytes) bytes and within
    BODY_TIMEOUT_S: it is read inside an admission slot, so a client that trickles its upload
    cannot hold the slot for long."""
    return await bounded_read(request, request.read())  # type: ignore[no-any-return]


async def bounded_read(request: web.Request, reading: Awaitable[Any]) -> Any:
    """`reading` (the body, or the form) within the size limit and BODY_TIMEOUT_S."""
    try:
        return await asyncio.wait_for(reading, BODY_TIMEOUT_S)
    except web.HTTPRequestEntityTooLarge:
        raise too_large(request) from None
    except TimeoutError:
        raise InvalidArgument(
            f"the request body did not arrive within {BODY_TIMEOUT_S:g} s; send it whole"
        ) from None


def too_large(request: web.Request) -> LimitExceeded:
    return LimitExceeded(
        f"the request body is over {request.client_max_size} bytes (max_message_bytes); send "
        "fewer or smaller images per request"
    )


def respond(reply: Reply, context: HttpCall) -> web.Response:
    headers = dict(reply.headers or {})
    headers.update((k, v) for k, v in context.trailer if k == "x-request-id")
    return web.Response(
        body=reply.body, status=reply.status, content_type=reply.content_type, headers=headers
    )


def add_routes(app: web.Application, gate: HttpGate, features: FeatureService) -> None:
    v2 = V2Http(features)

    def endpoint(method: str, message: Callable[[web.Request], Any]) -> Any:
        async def handle(request: web.Request) -> web.Response:
            call = message(request)
            reply, context = await gate.call(request, method, getattr(v2, method), call)
            return respond(reply, context)

        return handle

    def match(request: web.Request) -> dict[str, str]:
        return dict(request.match_info)

    def infer(request: web.Request) -> InferCall:
        info = request.match_info
        header = request.headers.get(HEADER_LENGTH)
        return InferCall(info["model"], info.get("version", ""), b"", header)

    routes: list[tuple[str, str, str, Callable[[web.Request], Any]]] = [
        ("GET", "/v2", "ServerMetadata", match),
        ("GET", "/v2/health/live", "ServerLive", match),
        ("GET", "/v2/health/ready", "ServerReady", match),
    ]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [
            ("GET", prefix, "ModelMetadata", match),
            ("GET", f"{prefix}/ready", "ModelReady", match),
            ("POST", f"{prefix}/infer", "ModelInfer", infer),
        ]
    for verb, path, method, message in routes:
        app.router.add_route(verb, path, endpoint(method, message))
