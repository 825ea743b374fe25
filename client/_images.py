"""User images -> protocol ``Image`` messages, shared by the sync, async and bulk paths.

Pure (no I/O except reading image files). PIL and torch are optional: they are imported only
when the caller hands us one of their objects, detected by the object's module name, so
``import layertap.client`` never pulls them in.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from layertap.common.options import WIRE_DTYPES
from layertap.v1 import layertap_pb2 as pb

ImageLike: TypeAlias = Any
"""One image: a file path (str / os.PathLike), encoded file bytes (bytes / bytearray /
memoryview), a PIL.Image.Image, a numpy array or a torch tensor (see :func:`image_to_proto`)."""

_ACCEPTED_ARRAYS = (
    "accepted arrays: uint8 [H,W,3] RGB, uint8 [H,W] or [H,W,1] gray, uint8 [H,W,4] RGBA "
    "(alpha dropped), float32 [3,H,W] or [1,3,H,W] (already normalised model input)"
)
_ACCEPTED_TENSORS = (
    "accepted torch tensors: uint8 [3,H,W] or [1,3,H,W] RGB, floating [3,H,W] or [1,3,H,W] "
    "(already normalised model input, sent as float32)"
)
_BATCH_HINT = "; to send several images pass a list of them (e.g. list(batch))"


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
    wire = WIRE_DTYPES[dtype]
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
