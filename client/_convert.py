"""Conversions between user objects and protocol messages, shared by the sync and async clients.

Everything here is pure (no I/O except reading image files) so it can be unit-tested without a
server. PIL and torch are optional: they are imported only when the caller hands us one of
their objects, detected by the object's module name, so ``import layertap.client`` never pulls
them in.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from layertap.v1 import layertap_pb2 as pb

from .errors import FeatureServiceError
from .types import (
    ExtractMetadata,
    ExtractResult,
    ModelDescription,
    ModelInfo,
    ModuleInfo,
    NodeInfo,
    Preprocessing,
    ResolvedNode,
    ServerInfo,
    Timings,
)

ImageLike: TypeAlias = Any
"""One image: a file path (str / os.PathLike), encoded file bytes (bytes / bytearray /
memoryview), a PIL.Image.Image, a numpy array or a torch tensor (see :func:`image_to_proto`)."""

NodesArg: TypeAlias = str | Sequence[str] | Mapping[str, str]

POOLING: dict[str, pb.Pooling] = {
    "raw": pb.POOLING_RAW,
    "avg": pb.POOLING_AVG,
    "max": pb.POOLING_MAX,
    "gem": pb.POOLING_GEM,
    "cls": pb.POOLING_CLS,
    "mean": pb.POOLING_MEAN,
}
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")

# Wire dtype -> numpy dtype of the raw little-endian bytes. bfloat16 has no numpy dtype: it is
# read as uint16 and widened to float32 (see bfloat16_to_float32).
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "uint8": np.dtype("<u1"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}

_ACCEPTED_ARRAYS = (
    "accepted arrays: uint8 [H,W,3] RGB, uint8 [H,W] or [H,W,1] gray, uint8 [H,W,4] RGBA "
    "(alpha dropped), float32 [3,H,W] or [1,3,H,W] (already normalised model input)"
)
_ACCEPTED_TENSORS = (
    "accepted torch tensors: uint8 [3,H,W] or [1,3,H,W] RGB, floating [3,H,W] or [1,3,H,W] "
    "(already normalised model input, sent as float32)"
)
_BATCH_HINT = "; to send several images pass a list of them (e.g. list(batch))"


# --------------------------------------------------------------------------- images -> proto


def _module_of(obj: object) -> str:
    return type(obj).__module__ or ""


def _is_pil(obj: object) -> bool:
    return _module_of(obj).startswith("PIL.")


def _is_torch(obj: object) -> bool:
    # torchvision.tv_tensors.Image subclasses torch.Tensor, hence "torch" and not "torch.".
    return _module_of(obj).startswith("torch")


def _is_single_image(obj: object) -> bool:
    return (
        isinstance(obj, (str, bytes, bytearray, memoryview, os.PathLike, np.ndarray))
        or _is_pil(obj)
        or _is_torch(obj)
    )


def as_image_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """One image or several, as a list.

    Only lists, tuples and iterators count as "several": a str, bytes, path, ndarray, PIL
    image or tensor is always one image, even though some of them are iterable.
    """
    if isinstance(images, (list, tuple)):
        items = list(images)
    elif _is_single_image(images):
        items = [images]
    elif isinstance(images, Iterator):
        items = list(images)
    else:
        items = [images]  # rejected with a TypeError naming the type by image_to_proto
    if not items:
        raise ValueError("no images given: pass one image or a non-empty list of images")
    return items


def _raw_tensor(array: np.ndarray, dtype: str) -> pb.Image:
    wire = _WIRE_DTYPES[dtype]
    data = np.ascontiguousarray(array, dtype=wire).tobytes()
    return pb.Image(tensor=pb.Tensor(dtype=dtype, shape=list(array.shape), data=data))


def _check_hw(h: int, w: int, what: str) -> None:
    if h <= 0 or w <= 0:
        raise ValueError(f"{what} has an empty spatial size {h}x{w}")


def _uint8_to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 [H,W], [H,W,1], [H,W,3] or [H,W,4] -> [H,W,3]; ValueError for anything else."""
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    elif not (array.ndim == 3 and array.shape[2] == 3):
        hint = _BATCH_HINT if array.ndim == 4 else ""
        raise ValueError(
            f"uint8 array of shape {list(array.shape)} is not an image; {_ACCEPTED_ARRAYS}{hint}"
        )
    _check_hw(array.shape[0], array.shape[1], "uint8 image")
    return array


def _is_chw_input(shape: Sequence[int]) -> bool:
    """[3,H,W] or [1,3,H,W]: the float layouts the server uses as model input as is."""
    return (len(shape) == 3 and shape[0] == 3) or (
        len(shape) == 4 and shape[0] == 1 and shape[1] == 3
    )


def _numpy_to_proto(array: np.ndarray) -> pb.Image:
    if array.dtype == np.uint8:
        return _raw_tensor(_uint8_to_rgb(array), "uint8")
    if array.dtype.kind == "f" and array.dtype.itemsize == 4:
        if not _is_chw_input(array.shape):
            hint = _BATCH_HINT if array.ndim == 4 else ""
            raise ValueError(
                f"float32 array of shape {list(array.shape)} is not a model input; "
                f"{_ACCEPTED_ARRAYS}{hint}"
            )
        _check_hw(array.shape[-2], array.shape[-1], "float32 input")
        return _raw_tensor(array, "float32")
    hint = ""
    if array.dtype.kind == "f":
        hint = " (convert with array.astype(np.float32))"
    raise ValueError(
        f"numpy array of dtype {array.dtype} and shape {list(array.shape)} is not accepted"
        f"{hint}; {_ACCEPTED_ARRAYS}"
    )


def _pil_to_proto(image: Any) -> pb.Image:
    from PIL import Image  # only reached when the caller already uses PIL

    if not isinstance(image, Image.Image):
        raise TypeError(f"unsupported image type {type(image).__module__}.{type(image).__name__}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(rgb, dtype=np.uint8)
    _check_hw(array.shape[0], array.shape[1], "PIL image")
    return _raw_tensor(array, "uint8")


def _torch_to_proto(tensor: Any) -> pb.Image:
    import torch  # only reached when the caller already uses torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"unsupported image type {type(tensor).__module__}.{type(tensor).__name__}")
    t = tensor.detach().cpu().as_subclass(torch.Tensor)
    shape = tuple(t.shape)
    hint = _BATCH_HINT if t.ndim == 4 else ""
    if t.dtype == torch.uint8:
        if not _is_chw_input(shape):
            raise ValueError(
                f"uint8 tensor of shape {list(shape)} is not an image; {_ACCEPTED_TENSORS}{hint}"
            )
        hwc = t.reshape(3, shape[-2], shape[-1]).permute(1, 2, 0).contiguous().numpy()
        _check_hw(hwc.shape[0], hwc.shape[1], "uint8 tensor")
        return _raw_tensor(hwc, "uint8")
    if t.is_floating_point():
        if not _is_chw_input(shape):
            raise ValueError(
                f"{t.dtype} tensor of shape {list(shape)} is not a model input; "
                f"{_ACCEPTED_TENSORS}{hint}"
            )
        _check_hw(shape[-2], shape[-1], "float tensor")
        return _raw_tensor(t.to(torch.float32).contiguous().numpy(), "float32")
    raise ValueError(f"tensor of dtype {t.dtype} is not accepted; {_ACCEPTED_TENSORS}")


def image_to_proto(image: ImageLike) -> pb.Image:
    """One user image as a protocol ``Image``.

    Files and bytes travel encoded (the server decodes them and applies EXIF orientation).
    Pixels (PIL, uint8 arrays/tensors) travel as raw uint8 [H,W,3] RGB, resized and normalised
    by the server like a decoded file. Float arrays/tensors are already-normalised model input
    and are used as is. Raises ValueError/TypeError for anything else, before any RPC.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("empty image bytes")
        return pb.Image(encoded=data)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not str(image):
            raise ValueError("empty image path")
        data = path.read_bytes()
        if not data:
            raise ValueError(f"image file {str(path)!r} is empty")
        return pb.Image(encoded=data)
    if isinstance(image, np.ndarray):
        return _numpy_to_proto(image)
    if _is_pil(image):
        return _pil_to_proto(image)
    if _is_torch(image):
        return _torch_to_proto(image)
    raise TypeError(
        f"unsupported image type {type(image).__module__}.{type(image).__qualname__}; pass a "
        "file path, encoded bytes, a PIL image, a numpy array or a torch tensor"
    )


def images_to_proto(images: ImageLike | Sequence[ImageLike]) -> list[pb.Image]:
    """Convert one image or a sequence, prefixing errors with the image's index."""
    items = as_image_list(images)
    out = []
    for index, image in enumerate(items):
        try:
            out.append(image_to_proto(image))
        except (ValueError, TypeError) as exc:
            if len(items) == 1:
                raise
            cls = TypeError if isinstance(exc, TypeError) else ValueError
            raise cls(f"image {index}: {exc}") from exc
    return out


# --------------------------------------------------------------------------- request options


def normalize_nodes(nodes: NodesArg) -> tuple[list[str], dict[str, str]]:
    """``nodes`` as (names in order, aliases): a name, a list of names, or node -> output key."""
    if isinstance(nodes, str):
        names, aliases = [nodes], {}
    elif isinstance(nodes, Mapping):
        names, aliases = list(nodes.keys()), dict(nodes)
        for key, alias in aliases.items():
            if not isinstance(key, str) or not isinstance(alias, str):
                raise TypeError(f"node aliases must map str to str, got {key!r}: {alias!r}")
            if not alias:
                raise ValueError(f"empty output key for node {key!r}")
    elif isinstance(nodes, (bytes, bytearray)) or not isinstance(nodes, (Sequence, Iterator)):
        raise TypeError(
            f"nodes must be a str, a list of str or a mapping node -> key, got {type(nodes)}"
        )
    else:
        names, aliases = list(nodes), {}
    if not names:
        raise ValueError("no nodes given: name at least one node (see describe())")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"node names must be str, got {name!r}")
        if not name:
            raise ValueError("empty node name")
    keys = [aliases.get(n, n) for n in names]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"output keys requested more than once: {dupes}")
    return names, aliases


def parse_pool(pool: str | None) -> pb.Pooling:
    """``None``/"raw"/"avg"/"max"/"gem"/"cls"/"mean" (case-insensitive) -> the Pooling enum."""
    if pool is None:
        return pb.POOLING_RAW
    if not isinstance(pool, str):
        raise TypeError(f"pool must be a str or None, got {type(pool)}")
    try:
        return POOLING[pool.lower()]
    except KeyError:
        valid = ", ".join(repr(p) for p in POOLING)
        raise ValueError(f"unknown pool {pool!r}; valid: None, {valid}") from None


def build_extract_request(
    images: ImageLike | Sequence[ImageLike],
    *,
    model: str,
    nodes: NodesArg,
    pool: str | None,
    gem_p: float,
    normalize: bool,
    dtype: str,
) -> tuple[pb.ExtractRequest, int]:
    """Validate everything client-side and build the request; returns it and the image count."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty model name (see list_models())")
    names, aliases = normalize_nodes(nodes)
    pooling = parse_pool(pool)
    gem = float(gem_p)
    if not math.isfinite(gem) or gem <= 0:
        raise ValueError(f"gem_p must be a positive finite number, got {gem_p!r}")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(OUTPUT_DTYPES)}")
    proto_images = images_to_proto(images)
    request = pb.ExtractRequest(
        model=model,
        images=proto_images,
        nodes=names,
        aliases=aliases,
        output=pb.OutputOptions(pool=pooling, gem_p=gem, normalize=bool(normalize), dtype=dtype),
    )
    return request, len(proto_images)


# --------------------------------------------------------------------------- proto -> numpy


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: bf16 is a float32's top 16 bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def decode_tensor(tensor: pb.Tensor, what: str = "tensor", *, copy: bool = True) -> np.ndarray:
    """A protocol Tensor as a numpy array in native byte order; bfloat16 becomes float32.

    Lengths are checked against the shape so a broken server cannot make us misread memory.
    With ``copy=False`` uint8/float16/float32 results may be read-only views of the message.
    """
    wire = _WIRE_DTYPES.get(tensor.dtype)
    if wire is None:
        raise FeatureServiceError.invalid_response(
            f"{what} has unknown dtype {tensor.dtype!r} (expected one of {list(_WIRE_DTYPES)})"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise FeatureServiceError.invalid_response(f"{what} has a negative dimension {shape}")
    expected = math.prod(shape) * wire.itemsize
    if len(tensor.data) != expected:
        raise FeatureServiceError.invalid_response(
            f"{what} has {len(tensor.data)} bytes of data but shape {list(shape)} "
            f"and dtype {tensor.dtype} need {expected}"
        )
    array = np.frombuffer(tensor.data, dtype=wire).reshape(shape)
    if tensor.dtype == "bfloat16":
        return bfloat16_to_float32(array)  # a new array already
    native = wire.newbyteorder("=")
    if copy or array.dtype != native:
        return array.astype(native, copy=True)
    return array


def _f32(value: float) -> float:
    """A proto float32 as the short decimal it was written as (0.485, not 0.48500001430511475)."""
    return float(str(np.float32(value)))


def preprocessing_from_proto(p: pb.Preprocessing) -> Preprocessing:
    return Preprocessing(
        resize_size=int(p.resize_size),
        crop_size=tuple(int(x) for x in p.crop_size),
        mean=tuple(_f32(x) for x in p.mean),
        std=tuple(_f32(x) for x in p.std),
        interpolation=p.interpolation,
        antialias=bool(p.antialias),
    )


def model_info_from_proto(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        architecture=m.architecture,
        weights=m.weights,
        weights_sha256=m.weights_sha256,
        input_size=tuple(int(x) for x in m.input_size),
        preprocessing=preprocessing_from_proto(m.preprocessing),
        device=m.device,
        ready=bool(m.ready),
        status_message=m.status_message,
        random_weights=bool(m.random_weights),
        compute_dtype=m.compute_dtype,
    )


def models_from_proto(response: pb.ListModelsResponse) -> list[ModelInfo]:
    return [model_info_from_proto(m) for m in response.models]


def server_info_from_proto(response: pb.ListModelsResponse) -> ServerInfo:
    lim = response.limits
    return ServerInfo(
        version=response.server_version,
        max_images_per_request=lim.max_images_per_request,
        max_image_bytes=lim.max_image_bytes,
        max_image_pixels=lim.max_image_pixels,
        max_message_bytes=lim.max_message_bytes,
        max_batch_size=lim.max_batch_size,
        max_queue_images=lim.max_queue_images,
    )


def description_from_proto(response: pb.DescribeModelResponse) -> ModelDescription:
    return ModelDescription(
        model=model_info_from_proto(response.model),
        nodes=[
            NodeInfo(
                name=n.name,
                shape=tuple(int(d) for d in n.shape),
                dtype=n.dtype,
                layout=n.layout,
                op=n.op,
                target=n.target,
            )
            for n in response.nodes
        ],
        modules=[
            ModuleInfo(name=m.name, type=m.type, own_parameters=int(m.own_parameters))
            for m in response.modules
        ],
        extraction_mode=response.extraction_mode,
    )


def _metadata_from_proto(m: pb.ExtractMetadata) -> ExtractMetadata:
    t = m.timings
    return ExtractMetadata(
        model=m.model,
        weights_sha256=m.weights_sha256,
        device=m.device,
        batch_size=int(m.batch_size),
        nodes=[ResolvedNode(r.key, r.requested, r.node) for r in m.nodes],
        preprocessing=preprocessing_from_proto(m.preprocessing),
        timings=Timings(
            queue_ms=t.queue_ms,
            decode_ms=t.decode_ms,
            compute_ms=t.compute_ms,
            total_ms=t.total_ms,
        ),
    )


def parse_extract_response(response: pb.ExtractResponse, n_images: int) -> ExtractResult:
    """Decode and stack per-image outputs, checking the response against the protocol."""
    results = list(response.results)
    if len(results) != n_images:
        raise FeatureServiceError.invalid_response(
            f"{len(results)} image results for {n_images} images"
        )
    keys = [nt.key for nt in results[0].outputs]
    if len(set(keys)) != len(keys):
        raise FeatureServiceError.invalid_response(f"duplicate output keys {keys}")
    decoded: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for i, result in enumerate(results):
        image_keys = [nt.key for nt in result.outputs]
        if image_keys != keys:
            raise FeatureServiceError.invalid_response(
                f"image {i} has outputs {image_keys}, image 0 has {keys}"
            )
        for nt in result.outputs:
            what = f"output {nt.key!r} of image {i}"
            decoded[nt.key].append(decode_tensor(nt.tensor, what, copy=False))

    first = results[0].outputs
    layouts = {nt.key: nt.tensor.layout for nt in first}
    nodes = {nt.key: nt.node for nt in first}
    stacked: dict[str, np.ndarray | None] = {}
    per_image: list[dict[str, np.ndarray]] = [{} for _ in results]
    for key, arrays in decoded.items():
        if len({(a.shape, a.dtype) for a in arrays}) == 1:
            # One copy into a fresh writable buffer; per-image entries are views of it.
            out = np.empty((len(arrays), *arrays[0].shape), arrays[0].dtype.newbyteorder("="))
            for i, a in enumerate(arrays):
                out[i] = a
                per_image[i][key] = out[i]
            stacked[key] = out
        else:
            stacked[key] = None
            for i, a in enumerate(arrays):
                per_image[i][key] = np.array(a, dtype=a.dtype.newbyteorder("="), copy=True)
    metadata = _metadata_from_proto(response.metadata)
    return ExtractResult(stacked, per_image, layouts, nodes, metadata)
