"""Each extract option from the form a caller gives (str, dict, list, array) to its protocol
piece, with errors that say what to change: nodes, pool, priority, post steps, TTA, region
boxes, and the output options as a whole. The client SDK checks its arguments with these, and
the server reads the KServe v2 protocols' request parameters with them (the same names and
forms), then checks the result again like any Extract.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np

from layertap.v1 import layertap_pb2 as pb

from .options import (
    DEFAULT_POWER_ALPHA,
    DIM_OPS,
    ENDS_IN_L2,
    HEAD_OPS,
    MAP_POOLS,
    OUTPUT_DTYPES,
    POOLING,
    POST_FORMS,
    POST_OPS,
    PRIORITIES,
)

NodesArg: TypeAlias = str | Sequence[str] | Mapping[str, str]
PostArg: TypeAlias = str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]] | None
"""Post-processing steps: one step or a list of them (see :func:`parse_post`)."""
TtaArg: TypeAlias = str | Mapping[str, Any] | None
RegionsArg: TypeAlias = Sequence[Any] | None
"""One entry per image: None (no regions), or boxes (x1, y1, x2, y2) as a list or [R, 4] array."""


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
    if op in HEAD_OPS:
        if not isinstance(head, str) or not head.strip():
            raise ValueError(
                f"post op {op!r} needs a head name ('{op}:HEAD'); the server's heads are in "
                "get_server_info().heads"
            )
        step.head = head.strip()
    elif head is not None:
        raise ValueError(f"post op {op!r} takes no head (only 'center', 'pca', 'whiten' do)")
    if op in DIM_OPS:
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
        if op in HEAD_OPS and len(args) == 1:
            return post_step(op, head=args[0])
        if op in DIM_OPS and len(args) == 2:
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
    if levels and pooling not in MAP_POOLS:
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
        normalised = normalize or (steps[-1].op in ENDS_IN_L2 if steps else concat)
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
