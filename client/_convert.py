"""Conversions between user objects and protocol messages, shared by the sync and async clients.

Everything here is pure (no I/O except reading image files) so it can be unit-tested without a
server. PIL and torch are optional: they are imported only when the caller hands us one of
their objects, detected by the object's module name, so ``import layertap.client`` never pulls
them in.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import numpy as np

from layertap.v1 import layertap_pb2 as pb

from .errors import FeatureServiceError
from .types import (
    ExtractMetadata,
    ExtractResult,
    HeadInfo,
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
PostArg: TypeAlias = str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]] | None
"""Post-processing steps: one step or a list of them (see :func:`parse_post`)."""
TtaArg: TypeAlias = str | Mapping[str, Any] | None
RegionsArg: TypeAlias = Sequence[Any] | None
"""One entry per image: None (no regions), or boxes (x1, y1, x2, y2) as a list or [R, 4] array."""

POOLING: dict[str, pb.Pooling] = {
    "raw": pb.POOLING_RAW,
    "avg": pb.POOLING_AVG,
    "max": pb.POOLING_MAX,
    "gem": pb.POOLING_GEM,
    "cls": pb.POOLING_CLS,
    "mean": pb.POOLING_MEAN,
    "avgmax": pb.POOLING_AVGMAX,
    "catavgmax": pb.POOLING_CATAVGMAX,
    "rmac": pb.POOLING_RMAC,
    "rgem": pb.POOLING_RGEM,
    "cls_mean": pb.POOLING_CLS_MEAN,
    "cls+mean": pb.POOLING_CLS_MEAN,  # the DINOv2 paper's spelling
}
PARAMETER_DTYPES = ("float32", "float16", "bfloat16")
OUTPUT_DTYPES = (*PARAMETER_DTYPES, "int8")
"""Extract output dtypes; int8 is for L2-normalised pooled descriptors only (round(127 x))."""

POST_OPS: dict[str, pb.PostStep.Op] = {
    "l2": pb.PostStep.OP_L2,
    "power": pb.PostStep.OP_POWER,
    "center": pb.PostStep.OP_CENTER,
    "pca": pb.PostStep.OP_PCA,
    "whiten": pb.PostStep.OP_WHITEN,
}
POST_FORMS = (
    "'l2', 'power', 'power:ALPHA', 'center:HEAD', 'pca:HEAD', 'pca:HEAD:DIM', 'whiten:HEAD', "
    "'whiten:HEAD:DIM', or a dict {'op': ..., 'alpha': ..., 'head': ..., 'dim': ...}"
)
_HEAD_OPS = frozenset({"center", "pca", "whiten"})
_DIM_OPS = frozenset({"pca", "whiten"})
_ENDS_IN_L2 = frozenset(
    {pb.PostStep.OP_L2, pb.PostStep.OP_POWER, pb.PostStep.OP_PCA, pb.PostStep.OP_WHITEN}
)
_MAP_POOLS = frozenset({pb.POOLING_RMAC, pb.POOLING_RGEM})
DEFAULT_POWER_ALPHA = 0.5
PRIORITIES: dict[str, pb.Priority] = {"normal": pb.PRIORITY_NORMAL, "low": pb.PRIORITY_LOW}

# Wire dtype -> numpy dtype of the raw little-endian bytes. bfloat16 has no numpy dtype: it is
# read as uint16 and widened to float32 (see bfloat16_to_float32).
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "uint8": np.dtype("<u1"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
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
    """``None`` or a pool name (case-insensitive, see ``POOLING``) -> the Pooling enum."""
    if pool is None:
        return pb.POOLING_RAW
    if not isinstance(pool, str):
        raise TypeError(f"pool must be a str or None, got {type(pool)}")
    try:
        return POOLING[pool.lower()]
    except KeyError:
        valid = ", ".join(repr(p) for p in POOLING)
        raise ValueError(f"unknown pool {pool!r}; valid: None, {valid}") from None


def parse_priority(priority: str) -> pb.Priority:
    """ "normal" (interactive, the default) or "low" (bulk work) -> the Priority enum."""
    if not isinstance(priority, str) or priority.lower() not in PRIORITIES:
        valid = ", ".join(repr(p) for p in PRIORITIES)
        raise ValueError(f"unknown priority {priority!r}; valid: {valid}")
    return PRIORITIES[priority.lower()]


def _number(value: object, what: str) -> float:
    """A finite float from a number or a numeric string; ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, np.number)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return number


def _count(value: object, what: str) -> int:
    """A non-negative int from an int or a decimal string; ValueError naming ``what``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def post_step(
    op: str, *, alpha: float | None = None, head: str | None = None, dim: int | None = None
) -> pb.PostStep:
    """One validated PostStep: which fields an op takes is checked here, so a typo (a head on
    "l2", a dim on "center") fails before the request rather than being silently ignored."""
    if not isinstance(op, str) or op.lower() not in POST_OPS:
        raise ValueError(f"unknown post op {op!r}; valid: {', '.join(POST_OPS)}")
    op = op.lower()
    step = pb.PostStep(op=POST_OPS[op])
    if op == "power":
        step.alpha = DEFAULT_POWER_ALPHA if alpha is None else _number(alpha, "power alpha")
        if not 0 < step.alpha <= 1:
            raise ValueError(f"power alpha must be in (0, 1], got {alpha!r}")
    elif alpha is not None:
        raise ValueError(f"post op {op!r} takes no alpha (only 'power' does)")
    if op in _HEAD_OPS:
        if not isinstance(head, str) or not head.strip():
            raise ValueError(
                f"post op {op!r} needs a head name ('{op}:HEAD'); the server's heads are in "
                "get_server_info().heads"
            )
        step.head = head.strip()
    elif head is not None:
        raise ValueError(f"post op {op!r} takes no head (only 'center', 'pca', 'whiten' do)")
    if op in _DIM_OPS:
        step.dim = 0 if dim is None else _count(dim, f"{op} dim")
    elif dim is not None:
        raise ValueError(f"post op {op!r} takes no dim (only 'pca' and 'whiten' do)")
    return step


def parse_post_step(step: str | Mapping[str, Any]) -> pb.PostStep:
    """One post-processing step from its string form ("l2", "power", "power:0.3",
    "center:HEAD", "pca:HEAD", "pca:HEAD:128", "whiten:HEAD", "whiten:HEAD:128") or a dict
    ``{"op": ..., "alpha": ..., "head": ..., "dim": ...}``."""
    if isinstance(step, Mapping):
        unknown = sorted(set(step) - {"op", "alpha", "head", "dim"})
        if unknown or "op" not in step:
            problem = f"unknown keys {unknown}" if unknown else "no 'op'"
            raise ValueError(f"post step {dict(step)!r} has {problem}; expected {POST_FORMS}")
        return post_step(
            step["op"], alpha=step.get("alpha"), head=step.get("head"), dim=step.get("dim")
        )
    if not isinstance(step, str):
        raise TypeError(f"a post step must be a str or a dict, got {step!r}; expected {POST_FORMS}")
    op, *args = step.strip().split(":")
    op = op.strip().lower()
    try:
        if op in ("l2", "power") and not args:
            return post_step(op)
        if op == "power" and len(args) == 1:
            return post_step(op, alpha=_number(args[0], "power alpha"))
        if op in _HEAD_OPS and len(args) == 1:
            return post_step(op, head=args[0])
        if op in _DIM_OPS and len(args) == 2:
            dim = _count(args[1], f"{op} dim")
            if dim == 0:
                raise ValueError(f"{op} dim must be at least 1 (leave it out for all components)")
            return post_step(op, head=args[0], dim=dim)
    except ValueError as exc:
        raise ValueError(f"post step {step!r}: {exc}") from None
    raise ValueError(f"cannot read post step {step!r}; expected {POST_FORMS}")


def parse_post(post: PostArg) -> list[pb.PostStep]:
    """``post=``: None, one step, or a list of steps applied in order (see
    :func:`parse_post_step`); errors name the step's position."""
    if post is None:
        return []
    if isinstance(post, (str, Mapping)):
        return [parse_post_step(post)]
    if not isinstance(post, (Sequence, Iterator)):
        raise TypeError(f"post must be a str, a dict or a list of them, got {type(post)}")
    steps = list(post)
    out = []
    for i, step in enumerate(steps):
        try:
            out.append(parse_post_step(step))
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"post[{i}]: {exc}" if len(steps) > 1 else str(exc)) from None
    return out


def parse_tta(tta: TtaArg) -> pb.TestTimeAugmentation | None:
    """``tta=``: None, "flip", or ``{"flip": bool, "scales": [1, 0.7071, 0.5]}``."""
    if tta is None:
        return None
    forms = "None, 'flip' or a dict {'flip': bool, 'scales': [1, 0.7071, 0.5]}"
    if isinstance(tta, str):
        if tta.lower() != "flip":
            raise ValueError(f"tta must be {forms}, got {tta!r}")
        return pb.TestTimeAugmentation(flip=True)
    if not isinstance(tta, Mapping):
        raise TypeError(f"tta must be {forms}, got {tta!r}")
    unknown = sorted(set(tta) - {"flip", "scales"})
    if unknown:
        raise ValueError(f"tta has unknown keys {unknown}; valid: 'flip', 'scales'")
    flip = tta.get("flip", False)
    if not isinstance(flip, bool):
        raise TypeError(f"tta 'flip' must be a bool, got {flip!r}")
    scales = tta.get("scales")
    if scales is None:
        scales = ()
    if isinstance(scales, (str, bytes)) or not isinstance(scales, (Sequence, np.ndarray)):
        raise ValueError(f"tta 'scales' must be a list of numbers like [1, 0.7071], got {scales!r}")
    values = [_number(s, "a tta scale") for s in scales]
    bad = [s for s in values if not s > 0]
    if bad:
        raise ValueError(f"tta scales must be positive, got {bad}")
    return pb.TestTimeAugmentation(flip=flip, scales=values)


def parse_boxes(entry: Any, what: str = "regions") -> list[pb.Box]:
    """One image's regions: None or empty (none), a sequence of (x1, y1, x2, y2) boxes or an
    [R, 4] array, in pixel coordinates of the image as sent."""
    if entry is None:
        return []
    if isinstance(entry, (str, bytes, Mapping)):
        raise TypeError(f"{what} must be a list of (x1, y1, x2, y2) boxes or an [R, 4] array")
    try:
        boxes = np.asarray(entry, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"{what} must be a list of (x1, y1, x2, y2) boxes or an [R, 4] array, got {entry!r}"
        ) from None
    if boxes.size == 0:
        return []
    if boxes.ndim == 1 and boxes.shape[0] == 4:
        raise ValueError(
            f"{what} is one box {entry!r}, not a list of boxes; regions takes one entry per "
            "image: regions=[[(x1, y1, x2, y2), ...], ...]"
        )
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} must have shape [R, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{what} has non-finite coordinates")
    bad = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if bad.size:
        raise ValueError(
            f"{what} box {int(bad[0])} {boxes[bad[0]].tolist()} is empty: need x1 < x2 and y1 < y2"
        )
    return [pb.Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for b in boxes.tolist()]


def parse_regions(regions: RegionsArg, n_images: int) -> list[list[pb.Box]] | None:
    """``regions=``: None, or one entry per image (see :func:`parse_boxes`)."""
    if regions is None:
        return None
    if isinstance(regions, (str, bytes, Mapping)) or not isinstance(
        regions, (Sequence, np.ndarray)
    ):
        raise TypeError(
            "regions must be None or a list with one entry per image (None, a list of "
            f"(x1, y1, x2, y2) boxes, or an [R, 4] array), got {type(regions)}"
        )
    if len(regions) != n_images:
        raise ValueError(
            f"regions has {len(regions)} entries for {n_images} image(s): give one per image "
            "(None for an image without regions)"
        )
    label = (lambda i: f"regions[{i}]") if n_images > 1 else (lambda i: "regions[0]")
    return [parse_boxes(entry, label(i)) for i, entry in enumerate(regions)]


def attach_regions(images: Sequence[pb.Image], regions: RegionsArg) -> None:
    """Put each image's boxes on its Image message, so any split into several requests keeps
    the regions with their image."""
    parsed = parse_regions(regions, len(images))
    if parsed is None:
        return
    for image, boxes in zip(images, parsed, strict=True):
        del image.regions[:]
        image.regions.extend(boxes)


def build_output_options(
    *,
    pool: str | None,
    gem_p: float = 3.0,
    normalize: bool = False,
    dtype: str = "float32",
    post: PostArg = None,
    concat: bool = False,
    concat_key: str | None = None,
    tta: TtaArg = None,
    rmac_levels: int = 0,
    roi_size: int = 0,
) -> pb.OutputOptions:
    """Validate the output options client-side (ValueError/TypeError saying what to change)
    and build OutputOptions; the server checks them again."""
    pooling = parse_pool(pool)
    pooled = pooling != pb.POOLING_RAW
    gem = float(gem_p)
    if not math.isfinite(gem) or gem <= 0:
        raise ValueError(f"gem_p must be a positive finite number, got {gem_p!r}")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(OUTPUT_DTYPES)}")
    steps = parse_post(post)
    if not isinstance(concat, bool):
        raise TypeError(f"concat must be a bool, got {concat!r}")
    if concat_key is not None:
        if not isinstance(concat_key, str) or not concat_key:
            raise ValueError(f"concat_key must be a non-empty str, got {concat_key!r}")
        if not concat:
            raise ValueError("concat_key names the concatenated output: pass concat=True too")
    augment = parse_tta(tta)
    levels = _count(rmac_levels, "rmac_levels")
    if levels and pooling not in _MAP_POOLS:
        raise ValueError("rmac_levels applies to pool='rmac' or 'rgem' only")
    roi = _count(roi_size, "roi_size")
    for what, wanted in (
        ("post", bool(steps)),
        ("concat", concat),
        ("tta", augment is not None),
        ("dtype='int8'", dtype == "int8"),
    ):
        if wanted and not pooled:
            raise ValueError(f"{what} works on pooled descriptors: pick a pool (e.g. pool='gem')")
    if dtype == "int8":
        normalised = normalize or (steps[-1].op in _ENDS_IN_L2 if steps else concat)
        if not normalised:
            raise ValueError(
                "dtype='int8' quantises L2-normalised descriptors: pass normalize=True, "
                "concat=True, or end post with 'l2', 'power', 'pca' or 'whiten'"
            )
    return pb.OutputOptions(
        pool=pooling,
        gem_p=gem,
        normalize=bool(normalize),
        dtype=dtype,
        post=steps,
        concat=concat,
        concat_key=concat_key or "",
        tta=augment,
        rmac_levels=levels,
        roi_size=roi,
    )


def build_request_template(
    *,
    model: str,
    nodes: NodesArg,
    priority: str = "normal",
    native_resolution: bool = False,
    **output: Any,
) -> pb.ExtractRequest:
    """Validate every option client-side and build an ExtractRequest without images.
    ``output``: the keywords of :func:`build_output_options` (pool, gem_p, normalize, dtype,
    post, concat, concat_key, tta, rmac_levels, roi_size)."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty model name (see list_models())")
    names, aliases = normalize_nodes(nodes)
    options = build_output_options(**output)
    if not isinstance(native_resolution, bool):
        raise TypeError(f"native_resolution must be a bool, got {native_resolution!r}")
    return pb.ExtractRequest(
        model=model,
        nodes=names,
        aliases=aliases,
        output=options,
        priority=parse_priority(priority),
        native_resolution=native_resolution,
    )


EXTRACT_OPTIONS = (
    "model",
    "nodes",
    "priority",
    "native_resolution",
    "pool",
    "gem_p",
    "normalize",
    "dtype",
    "post",
    "concat",
    "concat_key",
    "tta",
    "rmac_levels",
    "roi_size",
)
"""The keyword arguments of ``extract`` and ``extract_many`` (both clients) that go into the
request: all but the images, their regions, the timeout and extract_many's run options."""


def request_template(arguments: Mapping[str, Any]) -> pb.ExtractRequest:
    """The validated ExtractRequest (no images) for a call of ``extract`` or ``extract_many``
    of either client, from that call's arguments (its ``locals()``, of which the
    :data:`EXTRACT_OPTIONS` are read): the one place their options become a request."""
    return build_request_template(**{name: arguments[name] for name in EXTRACT_OPTIONS})


def with_images(template: pb.ExtractRequest, images: Sequence[pb.Image]) -> pb.ExtractRequest:
    """A copy of ``template`` carrying ``images``."""
    request = pb.ExtractRequest()
    request.CopyFrom(template)
    request.images.extend(images)
    return request


def build_extract_request(
    images: ImageLike | Sequence[ImageLike], *, regions: RegionsArg = None, **options: Any
) -> tuple[pb.ExtractRequest, int]:
    """Validate everything client-side and build the request; returns it and the image count.
    ``options``: the keywords of :func:`build_request_template`."""
    template = build_request_template(**options)
    proto_images = images_to_proto(images)
    attach_regions(proto_images, regions)
    return with_images(template, proto_images), len(proto_images)


def parameters_request(
    model: str, names: str | Sequence[str], dtype: str
) -> pb.GetParametersRequest:
    """A validated GetParametersRequest."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty model name (see list_models())")
    name_list = [names] if isinstance(names, str) else list(names)
    if not name_list or not all(isinstance(n, str) and n for n in name_list):
        raise ValueError(
            f"names must be a parameter name, a module path or a non-empty list of them, "
            f"got {names!r}"
        )
    if dtype not in PARAMETER_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(PARAMETER_DTYPES)}")
    return pb.GetParametersRequest(model=model, names=name_list, dtype=dtype)


# --------------------------------------------------------------------------- request sizing

REQUEST_HEADROOM_BYTES = 64 * 1024
"""Kept free under the message limit: gRPC framing, and slack for fields we do not count."""
_PER_IMAGE_OVERHEAD = 16  # field tag + length prefixes of one repeated Image entry


def image_wire_bytes(image: pb.Image) -> int:
    """Bytes one image adds to an ExtractRequest."""
    return image.ByteSize() + _PER_IMAGE_OVERHEAD


def image_budget(template: pb.ExtractRequest, info: ServerInfo | None, client_max: int) -> int:
    """Bytes of images one request may carry: the smaller of the server's and this client's
    message limits, less the request's own fields and headroom."""
    limits = [client_max]
    if info is not None and info.max_message_bytes > 0:
        limits.append(info.max_message_bytes)
    limit = min(limits)
    headroom = min(REQUEST_HEADROOM_BYTES, limit // 16)
    return max(1, limit - template.ByteSize() - headroom)


def images_per_request(info: ServerInfo | None, wanted: int | None = None) -> int:
    """Images one request may carry: ``wanted`` capped by the server's limit (0: unknown)."""
    cap = info.max_images_per_request if info is not None else 0
    if wanted is None:
        return cap if cap > 0 else 1 << 30
    return min(wanted, cap) if cap > 0 else wanted


def check_image(image: pb.Image, info: ServerInfo | None, budget: int, what: str) -> None:
    """Refuse locally (RESOURCE_EXHAUSTED, as the server would) an image that cannot be sent:
    encoded bytes over the server's ``max_image_bytes``, or alone over the message budget."""
    if (
        info is not None
        and info.max_image_bytes > 0
        and image.WhichOneof("source") == "encoded"
        and len(image.encoded) > info.max_image_bytes
    ):
        raise FeatureServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{what} is {len(image.encoded)} encoded bytes, over the server's max_image_bytes "
            f"({info.max_image_bytes}); not sent",
        )
    size = image_wire_bytes(image)
    if size > budget:
        raise FeatureServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{what} takes {size} bytes in a request, over what one message may carry "
            f"({budget} bytes under max_message_bytes); not sent",
        )


def plan_requests(
    template: pb.ExtractRequest,
    images: Sequence[pb.Image],
    info: ServerInfo | None,
    client_max: int,
) -> list[pb.ExtractRequest]:
    """The Extract requests that carry ``images`` within the server's limits (one unless
    there are more images than ``max_images_per_request`` or bytes than one message takes).
    Raises RESOURCE_EXHAUSTED, before sending anything, for an image that cannot be sent."""
    budget = image_budget(template, info, client_max)
    for i, image in enumerate(images):
        check_image(image, info, budget, f"image {i}" if len(images) > 1 else "the image")
    sizes = [image_wire_bytes(image) for image in images]
    return [
        with_images(template, images[r.start : r.stop])
        for r in plan_chunks(sizes, images_per_request(info), budget)
    ]


def plan_chunks(sizes: Sequence[int], max_images: int, budget: int) -> list[range]:
    """Split images (their wire sizes, in order) into consecutive requests of at most
    ``max_images`` images and ``budget`` bytes each; every image fits alone (checked first)."""
    chunks: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_images or total + size > budget):
            chunks.append(range(start, i))
            start, total = i, 0
        total += size
    if sizes:
        chunks.append(range(start, len(sizes)))
    return chunks


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
        resize_kernel=p.resize_kernel,
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
        prefix_tokens=int(m.prefix_tokens),
        extraction_mode=m.extraction_mode,
    )


def models_from_proto(response: pb.ListModelsResponse) -> list[ModelInfo]:
    return [model_info_from_proto(m) for m in response.models]


def server_info_from_proto(
    response: pb.GetServerInfoResponse | pb.ListModelsResponse,
) -> ServerInfo:
    """ServerInfo from GetServerInfo, or from ListModels (older servers: limits only)."""
    lim = response.limits
    common = {
        "version": response.server_version,
        "max_images_per_request": int(lim.max_images_per_request),
        "max_image_bytes": int(lim.max_image_bytes),
        "max_image_pixels": int(lim.max_image_pixels),
        "max_message_bytes": int(lim.max_message_bytes),
        "max_batch_size": int(lim.max_batch_size),
        "max_queue_images": int(lim.max_queue_images),
        "max_stream_in_flight": int(lim.max_stream_in_flight),
        "max_parameter_bytes": int(lim.max_parameter_bytes),
    }
    if isinstance(response, pb.ListModelsResponse):
        return ServerInfo(**common, models=tuple(m.name for m in response.models))
    return ServerInfo(
        **common,
        image_formats=tuple(response.image_formats),
        input_dtypes=tuple(response.input_dtypes),
        pools=tuple(response.pools),
        output_dtypes=tuple(response.output_dtypes),
        models=tuple(response.models),
        devices=tuple(response.devices),
        methods=tuple(response.methods),
        heads=tuple(
            HeadInfo(
                name=h.name,
                model=h.model,
                input_dim=int(h.input_dim),
                components=int(h.components),
                nodes=tuple(h.nodes),
                pool=h.pool,
            )
            for h in response.heads
        ),
    )


def parameters_from_proto(response: pb.GetParametersResponse, model: str) -> dict[str, np.ndarray]:
    """Full parameter name -> writable array, in the server's order."""
    if response.model and response.model != model:
        raise FeatureServiceError.invalid_response(
            f"parameters of model {response.model!r}, asked for {model!r}"
        )
    out: dict[str, np.ndarray] = {}
    for nt in response.parameters:
        name = nt.key or nt.node
        if not name or name in out:
            raise FeatureServiceError.invalid_response(f"missing or repeated name {name!r}")
        out[name] = decode_tensor(nt.tensor, f"parameter {name!r}")
    return out


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
        extraction_reason=response.extraction_reason,
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


def split_result(result: ExtractResult) -> list[ExtractResult]:
    """One ExtractResult per image of ``result`` (arrays with leading dimension 1), each with
    its own copy of the data, so keeping one does not keep the whole batch alive."""
    out = []
    for image in result.per_image:
        stacked: dict[str, np.ndarray | None] = {k: a[None].copy() for k, a in image.items()}
        per_image = [{k: a[0] for k, a in stacked.items() if a is not None}]
        out.append(ExtractResult(stacked, per_image, result.layouts, result.nodes, result.metadata))
    return out


def merge_results(parts: Sequence[ExtractResult]) -> ExtractResult:
    """Several calls' results as one, images in order. Metadata is the first call's, with
    ``batch_size`` the largest and timings summed over the calls."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for part in parts[1:]:
        if list(part) != list(first):
            raise FeatureServiceError.invalid_response(
                f"calls answered different outputs {list(first)} and {list(part)}"
            )
    per_image = [image for part in parts for image in part.per_image]
    stacked: dict[str, np.ndarray | None] = {}
    for key in first:
        arrays = [image[key] for image in per_image]
        if len({(a.shape, a.dtype) for a in arrays}) == 1:
            out = np.stack(arrays)
            for i, image in enumerate(per_image):
                image[key] = out[i]
            stacked[key] = out
        else:
            stacked[key] = None
    t = [p.metadata.timings for p in parts]
    metadata = dataclasses.replace(
        first.metadata,
        batch_size=max(p.metadata.batch_size for p in parts),
        timings=Timings(
            queue_ms=sum(x.queue_ms for x in t),
            decode_ms=sum(x.decode_ms for x in t),
            compute_ms=sum(x.compute_ms for x in t),
            total_ms=sum(x.total_ms for x in t),
        ),
    )
    return ExtractResult(stacked, per_image, first.layouts, first.nodes, metadata)
