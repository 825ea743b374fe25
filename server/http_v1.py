"""layertap's own small HTTP API, for curl and notebooks:

  GET  /v1/models        the models (ListModels as proto3 JSON: names, readiness, weights)
  GET  /v1/models/{m}    one model's nodes with shapes (DescribeModel as proto3 JSON)
  POST /v1/extract       images in, JSON tensors out: a multipart form (image files, and the
                         fields model, nodes and any option by its SDK name) or a JSON object
                         {"model", "nodes", "images": [base64, ...], options...}; query-string
                         fields work too (`?model=...&nodes=...&pool=gem`)

`nodes` is a list, or names separated by commas. Options are the v2 request parameters
(kserve_tensors.py: pool, gem_p, normalize, dtype, post, concat, tta, ...), read the same way;
text values (form and query fields) are converted by the option's type. The answer:
{"model", "results": [{key: {"node", "dtype", "shape", "data"}}], "timings": {...}}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from google.protobuf import json_format

from layertap.v1 import layertap_pb2 as pb

from .batching import set_request_deadline
from .errors import InvalidArgument
from .http_server import HttpCall, HttpGate, json_body
from .http_v2 import Reply, _element, _values, bounded_read, read_body, respond
from .kserve_tensors import DATATYPE_OF, V2Output, extract_request
from .rpc import rpc

if TYPE_CHECKING:
    from .service import FeatureService

FLAGS = ("normalize", "concat", "native_resolution", "bypass_result_cache")
NUMBERS = {"gem_p": float, "rmac_levels": int, "roi_size": int}
NOT_OPTIONS = ("model", "nodes", "images", "image")


@dataclass
class ExtractCall:
    model: str  # read by @rpc for the metrics' model label (known once the body is read)
    fields: dict[str, Any]
    images: list[bytes]


def typed(name: str, text: str) -> object:
    """A form or query field's text as its option's type."""
    if name in FLAGS:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off", ""):
            return False
        raise InvalidArgument(f"field {name!r} must be true or false, got {text[:40]!r}")
    if name in NUMBERS:
        try:
            return NUMBERS[name](text)
        except ValueError:
            raise InvalidArgument(f"field {name!r} must be a number, got {text[:40]!r}") from None
    if name == "priority" and text.isdigit():
        return int(text)
    return text


def add_field(fields: dict[str, Any], key: str, text: str) -> None:
    """A form or query field; `nodes` may repeat (each adds its names), others are single."""
    if key == "nodes" and isinstance(fields.get(key), str):
        fields[key] = f"{fields[key]},{text}"
    else:
        fields[key] = typed(key, text)


def extract_of(call: ExtractCall) -> pb.ExtractRequest:
    """The Extract a /v1/extract call asks for (in the decode pool: base64 and JSON)."""
    fields = call.fields
    nodes = fields.get("nodes")
    if isinstance(nodes, str):
        nodes = [n.strip() for n in nodes.split(",") if n.strip()]
    if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
        raise InvalidArgument("send 'nodes': node names, a list or separated by commas")
    images = list(call.images)
    given = fields.get("images", [])
    if not isinstance(given, list):
        raise InvalidArgument("'images' must be a list of base64-encoded images")
    images += [_element(value) for value in given]
    if not isinstance(call.model, str) or not call.model:
        raise InvalidArgument("send 'model': a model name (GET /v1/models lists them)")
    options = {k: v for k, v in fields.items() if k not in NOT_OPTIONS}
    return extract_request(call.model, [pb.Image(encoded=b) for b in images], nodes, options)


def encode(answer: pb.ExtractResponse) -> Reply:
    results = []
    for result in answer.results:
        row = {}
        for out in result.outputs:
            t = out.tensor
            datatype = DATATYPE_OF.get(t.dtype, "FP32")
            values = _values(V2Output(out.key, datatype, list(t.shape), t.data))
            row[out.key] = {
                "node": out.node,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data": values,
            }
        results.append(row)
    timings = json_format.MessageToDict(answer.metadata.timings, preserving_proto_field_name=True)
    return Reply(
        json_body({"model": answer.metadata.model, "results": results, "timings": timings})
    )


class V1Http:
    def __init__(self, features: FeatureService) -> None:
        self.features = features
        self.metrics = features.metrics

    def identify(self, context: HttpCall) -> object:
        return self.features.identify(context)  # type: ignore[arg-type]

    @rpc
    async def Extract(self, call: ExtractCall, context: HttpCall) -> Reply:
        set_request_deadline(None)
        await read_fields(context.request, call)
        pool = self.features.pipeline.in_pool
        request = await pool(extract_of, call)
        answer = await self.features._extract(request, self.features._visible(context))  # type: ignore[arg-type]
        return await pool(encode, answer)


async def read_fields(request: web.Request, call: ExtractCall) -> None:
    """Query fields, then the body's: a multipart or urlencoded form, or a JSON object (parsed
    in the pool by `extract_of`'s caller)."""
    fields: dict[str, Any] = {}
    for key, value in request.query.items():
        add_field(fields, key, value)
    if request.content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await bounded_read(request, request.post())
        for key, value in form.items():
            if isinstance(value, web.FileField):
                call.images.append(value.file.read())
            elif key in ("image", "images") or not isinstance(value, str):
                raise InvalidArgument(f"form field {key!r} must be a file (curl -F image=@a.jpg)")
            else:
                add_field(fields, key, value)
    elif request.body_exists:
        body = await read_body(request)
        try:
            given = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidArgument(
                f"the body is neither a form nor JSON ({exc}); send a multipart form "
                "(curl -F image=@photo.jpg) or a JSON object"
            ) from None
        if not isinstance(given, Mapping):
            raise InvalidArgument("the JSON body must be an object")
        fields.update(given)
    call.fields = fields
    model = fields.get("model", "")
    call.model = model if isinstance(model, str) else ""


def add_routes(app: web.Application, gate: HttpGate, features: FeatureService) -> None:
    v1 = V1Http(features)

    async def models(request: web.Request) -> web.Response:
        reply, context = await gate.call(
            request, "ListModels", features.ListModels, pb.ListModelsRequest()
        )
        return _proto_json(reply, context)

    async def describe(request: web.Request) -> web.Response:
        message = pb.DescribeModelRequest(model=request.match_info["model"])
        reply, context = await gate.call(request, "DescribeModel", features.DescribeModel, message)
        return _proto_json(reply, context)

    async def extract(request: web.Request) -> web.Response:
        call = ExtractCall(request.query.get("model", ""), {}, [])
        reply, context = await gate.call(request, "Extract", v1.Extract, call)
        return respond(reply, context)

    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", describe)
    app.router.add_post("/v1/extract", extract)


def _proto_json(message: Any, context: HttpCall) -> web.Response:
    body = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return respond(Reply(json_body(body)), context)
