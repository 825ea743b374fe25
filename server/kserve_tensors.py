"""The Open Inference Protocol (KServe v2) in layertap's terms, for both of its transports
(kserve_grpc.py, http_v2.py): a request's input tensor becomes the Extract's images, its
parameters the OutputOptions and request fields (by the SDK's names, read with the SDK's own
parsers, common/option_parsing.py), and an ExtractResponse becomes v2 output tensors. Every
Extract check then runs as for layertap's own API. Torch-free; errors say what to send.

Inputs (one per request, ModelMetadata lists all three):
- `images`     BYTES [N]          one encoded image (JPEG, PNG, WebP, BMP, GIF) per element;
- `pixels`     UINT8 [N, H, W, 3] RGB, resized, cropped and normalised like an encoded image;
- `normalized` FP32  [N, 3, H, W] already preprocessed, used as is.
Outputs are node names, full or truncated (the last node under that prefix).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from layertap.common.option_parsing import build_output_options, parse_priority
from layertap.common.options import OUTPUT_OPTION_NAMES, REQUEST_OPTION_NAMES
from layertap.v1 import layertap_pb2 as pb

from .errors import InvalidArgument, LimitExceeded


class InputSpec(NamedTuple):
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size
    wire_dtype: str  # the layertap Tensor dtype of one image ("" for encoded bytes)


INPUTS = (
    InputSpec("images", "BYTES", (-1,), ""),
    InputSpec("pixels", "UINT8", (-1, -1, -1, 3), "uint8"),
    InputSpec("normalized", "FP32", (-1, 3, -1, -1), "float32"),
)
INPUT_BY_NAME = {spec.name: spec for spec in INPUTS}
INPUT_FORMS = "images (BYTES [N]), pixels (UINT8 [N, H, W, 3]) or normalized (FP32 [N, 3, H, W])"
ITEMSIZE = {"UINT8": 1, "FP32": 4}
NUMPY: dict[str, np.dtype[Any]] = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}
DATATYPE_OF = {
    "float32": "FP32",
    "float16": "FP16",
    "bfloat16": "BF16",
    "int8": "INT8",
    "uint8": "UINT8",
}
# Triton's own request parameters, which its clients may send: accepted where they ask for
# nothing layertap lacks (no sequence state; deadlines come from the transport's timeout).
TRITON_PARAMETERS = ("timeout", "sequence_id", "sequence_start", "sequence_end")
MAX_PARAMETER_TEXT = 64 * 1024


@dataclass
class V2Input:
    """One input tensor as either transport carries it: `raw` little-endian bytes (BYTES
    elements each behind a 4-byte length), or `elements`, the flattened values (typed contents,
    JSON data)."""

    name: str
    datatype: str
    shape: Sequence[int]
    raw: bytes | None = None
    elements: Sequence[Any] | None = None


class V2Output(NamedTuple):
    name: str
    datatype: str
    shape: list[int]
    data: bytes  # little-endian, row-major


def bytes_elements(raw: bytes, count: int, name: str = "images") -> list[bytes]:
    """The BYTES tensor in raw form: each element a 4-byte little-endian length and its bytes.
    Refuses a length that runs past the end or a count other than the shape's."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidArgument(f"input {name!r}: a BYTES element's 4-byte length is cut short")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise InvalidArgument(
                f"input {name!r}: a BYTES element says {size} bytes but {len(raw) - at} remain"
            )
        out.append(raw[at : at + size])
        at += size
        if len(out) > count:
            break
    if len(out) != count:
        raise InvalidArgument(
            f"input {name!r} has shape [{count}] but its data holds {len(out)} element(s)"
        )
    return out


def _check_shape(tensor: V2Input, spec: InputSpec) -> list[int]:
    shape = [int(d) for d in tensor.shape]
    fits = len(shape) == len(spec.shape) and all(
        d >= 0 and (want < 0 or d == want) for d, want in zip(shape, spec.shape, strict=True)
    )
    if not fits:
        form = ", ".join(
            "N" if i == 0 else ("*" if w < 0 else str(w)) for i, w in enumerate(spec.shape)
        )
        raise InvalidArgument(
            f"input {spec.name!r} ({spec.datatype}) must have shape [{form}], got {shape}"
        )
    return shape


def check_count(tensor: V2Input, max_images: int) -> None:
    """Refuse more images than max_images_per_request before any element is read."""
    count = int(tensor.shape[0]) if len(tensor.shape) else 0
    if count > max_images:
        raise LimitExceeded(
            f"{count} images in one request exceed max_images_per_request={max_images}; "
            "split the request"
        )


def images_of(tensor: V2Input) -> list[pb.Image]:
    """The request's images from its one input tensor. Raw data is sliced (a copy at memory
    speed); `elements` (typed contents, JSON) are converted with numpy, so callers run this off
    the event loop when the values came as a list."""
    spec = INPUT_BY_NAME.get(tensor.name)
    if spec is None:
        raise InvalidArgument(f"unknown input {tensor.name[:80]!r}; send one of {INPUT_FORMS}")
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(
            f"input {spec.name!r} must be {spec.datatype}, got datatype {tensor.datatype[:20]!r}"
        )
    shape = _check_shape(tensor, spec)
    count = shape[0]
    if spec.datatype == "BYTES":
        if tensor.raw is not None:
            encoded = bytes_elements(tensor.raw, count, spec.name)
        else:
            encoded = list(tensor.elements or ())
            if len(encoded) != count:
                raise InvalidArgument(
                    f"input {spec.name!r} has shape [{count}] but holds {len(encoded)} element(s)"
                )
        return [pb.Image(encoded=data) for data in encoded]
    per_image = math.prod(shape[1:])
    size = per_image * ITEMSIZE[spec.datatype]
    if tensor.raw is not None:
        data = tensor.raw
        if len(data) != count * size:
            raise InvalidArgument(
                f"input {spec.name!r} of shape {shape} needs {count * size} bytes of "
                f"{spec.datatype}, got {len(data)}"
            )
    else:
        data = _pack(spec, list(tensor.elements or ()), count * per_image)
    return [
        pb.Image(
            tensor=pb.Tensor(
                dtype=spec.wire_dtype, shape=shape[1:], data=data[i * size : (i + 1) * size]
            )
        )
        for i in range(count)
    ]


def _pack(spec: InputSpec, values: list[Any], want: int) -> bytes:
    """Listed values (contents fields, JSON data) as raw bytes of the input's datatype."""
    if len(values) != want:
        raise InvalidArgument(
            f"input {spec.name!r} needs {want} values for its shape, got {len(values)}"
        )
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"input {spec.name!r} ({spec.datatype}) holds values that are not numbers"
        ) from None
    if spec.datatype == "UINT8" and (
        ((array < 0) | (array > 255) | (array != np.floor(array))).any()
    ):
        raise InvalidArgument(
            f"input {spec.name!r} (UINT8) holds values outside the integers 0..255"
        )
    return array.astype(NUMPY[spec.datatype]).tobytes()


# --------------------------------------------------------------------------- parameters


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"parameter {name!r} must be a bool, got {value!r}")
    return value


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"parameter {name!r} must be a string, got {value!r}")
    if len(value) > MAX_PARAMETER_TEXT:
        raise InvalidArgument(f"parameter {name!r} is over {MAX_PARAMETER_TEXT} characters")
    return value


def _structured(name: str, value: object) -> object:
    """post / tta: the SDK's string forms, or JSON (a list or an object) in a string."""
    text = _text(name, value).strip()
    if text[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"parameter {name!r} is not valid JSON: {exc}") from None
    if name == "post":
        return [step.strip() for step in text.split(",") if step.strip()]
    return text


def _priority(value: object) -> pb.Priority:
    """ "normal" / "low", or Triton's integer levels: 0 (unset) and 1 are normal, higher low."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidArgument(f"parameter 'priority' must be 0 or more, got {value}")
        return pb.PRIORITY_NORMAL if value <= 1 else pb.PRIORITY_LOW
    try:
        return parse_priority(_text("priority", value))
    except ValueError as exc:
        raise InvalidArgument(f"parameter 'priority': {exc}") from None


def _triton(name: str, value: object) -> None:
    if name in ("sequence_id", "sequence_start", "sequence_end") and value not in (0, False, ""):
        raise InvalidArgument(
            f"parameter {name!r}: layertap's models are stateless; send requests without a sequence"
        )


def output_options(parameters: Mapping[str, object]) -> pb.OutputOptions:
    """OutputOptions from the parameters that name them, checked like the SDK's arguments."""
    kwargs: dict[str, Any] = {"pool": None}
    for name in OUTPUT_OPTION_NAMES:
        if name not in parameters:
            continue
        value = parameters[name]
        if name in ("normalize", "concat"):
            kwargs[name] = _flag(name, value)
        elif name in ("post", "tta"):
            kwargs[name] = _structured(name, value)
        elif name in ("pool", "dtype", "concat_key"):
            kwargs[name] = _text(name, value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"parameter {name!r} must be a number, got {value!r}")
        else:
            kwargs[name] = value
    try:
        return build_output_options(**kwargs)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"parameters: {exc}") from None


def extract_request(
    model: str, images: list[pb.Image], outputs: Sequence[str], parameters: Mapping[str, object]
) -> pb.ExtractRequest:
    """The layertap Extract a v2 inference request asks for."""
    known = (*OUTPUT_OPTION_NAMES, *REQUEST_OPTION_NAMES, *TRITON_PARAMETERS)
    unknown = sorted(name for name in parameters if name not in known)
    if unknown:
        raise InvalidArgument(
            f"unknown parameter(s) {[u[:40] for u in unknown[:5]]}; this server takes "
            f"{', '.join(OUTPUT_OPTION_NAMES + REQUEST_OPTION_NAMES)}"
        )
    if not outputs:
        raise InvalidArgument(
            "name at least one output: a node of the model, full or truncated (ModelMetadata "
            "lists them)"
        )
    request = pb.ExtractRequest(
        model=model, images=images, nodes=list(outputs), output=output_options(parameters)
    )
    for name, value in parameters.items():
        if name in ("native_resolution", "bypass_result_cache"):
            setattr(request, name, _flag(name, value))
        elif name == "priority":
            request.priority = _priority(value)
        elif name in TRITON_PARAMETERS:
            _triton(name, value)
    return request


# --------------------------------------------------------------------------- answers


def outputs_of(answer: pb.ExtractResponse) -> list[V2Output]:
    """One v2 tensor per output key, the images' tensors stacked on a leading batch dimension
    (the keys are the outputs as requested, or the concatenation's key)."""
    if not answer.results:
        return []
    out = []
    for index, first in enumerate(answer.results[0].outputs):
        tensors = [result.outputs[index].tensor for result in answer.results]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise InvalidArgument(
                f"output {first.key!r} has a different shape for each image (native resolution "
                "or regions): send one image per request, or pool it"
            )
        out.append(
            V2Output(
                name=first.key,
                datatype=DATATYPE_OF.get(first.tensor.dtype, first.tensor.dtype.upper()),
                shape=[len(tensors), *first.tensor.shape],
                data=b"".join(t.data for t in tensors),
            )
        )
    return out


def model_metadata(name: str, nodes: Sequence[Any]) -> dict[str, Any]:
    """ModelMetadata as the protocol's JSON: the three inputs, and every node of the model's
    catalogue as an output with its shape (batch dimension -1) and datatype."""
    return {
        "name": name,
        "versions": ["1"],
        "platform": "layertap_pytorch",
        "inputs": [
            {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in INPUTS
        ],
        "outputs": [
            {
                "name": node.name,
                "datatype": DATATYPE_OF.get(node.dtype, "FP32"),
                "shape": [-1, *node.shape[1:]],  # the catalogue's shapes are for a batch of 1
            }
            for node in nodes
        ],
    }
