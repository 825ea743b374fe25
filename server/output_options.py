"""A request's OutputOptions -> the OutputSpec the worker runs, every field bounded and checked
before any compute, and the descriptor size each head step will receive. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from layertap.common.options import (
    DEFAULT_POWER_ALPHA,
    HEAD_OPS,
    OUTPUT_DTYPES,
    POOL_NAMES,
    POST_OP_NAMES,
)
from layertap.v1 import layertap_pb2 as pb

from .errors import InvalidArgument
from .spec import (
    NodeSpec,
    OutputSpec,
    PostOp,
    check_name_length,
    check_output,
    is_unit_output,
    pooled_dim,
)

if TYPE_CHECKING:
    from .heads import Head

# Bounds of the descriptor options (each view is one more forward).
MAX_TTA_VIEWS = 8
TTA_SCALES = (0.25, 4.0)
RMAC_LEVELS = (1, 5)
ROI_SIZES = (1, 64)
# Entries a request may list (before duplicates collapse), checked before they are iterated on
# the event loop: a 64 MiB message holds millions of PostSteps or scales.
MAX_POST_STEPS = 16
MAX_TTA_SCALE_ENTRIES = 64


def post_op(index: int, step: pb.PostStep, heads: Mapping[str, Head], model: str) -> PostOp:
    """One PostStep -> PostOp, every field checked (heads must exist and suit the model)."""
    op = POST_OP_NAMES.get(step.op)
    if op is None:
        names = ", ".join(f"{pb.PostStep.Op.Name(k)} ({k})" for k in sorted(POST_OP_NAMES))
        raise InvalidArgument(f"post[{index}]: unknown op {step.op}; use one of {names}")
    where = f"post[{index}] ({pb.PostStep.Op.Name(step.op)})"
    alpha = DEFAULT_POWER_ALPHA
    if op == "power":
        alpha = step.alpha or DEFAULT_POWER_ALPHA
        if not math.isfinite(alpha) or not 0 < alpha <= 1:
            raise InvalidArgument(f"{where}: alpha must be in (0, 1] (0: 0.5), got {step.alpha}")
    elif step.alpha:
        raise InvalidArgument(f"{where}: alpha is for OP_POWER only; leave it 0")
    if op not in HEAD_OPS:
        if step.head or step.dim:
            raise InvalidArgument(f"{where}: head and dim are for OP_CENTER/OP_PCA/OP_WHITEN only")
        return PostOp(op, alpha)
    known = ", ".join(sorted(heads)) or "none; add [[heads]] to the server config"
    if not step.head:
        raise InvalidArgument(f"{where} needs a head name; registered heads: {known}")
    check_name_length(step.head, f"{where}: head", f"registered heads: {known}")
    head = heads.get(step.head)
    if head is None:
        raise InvalidArgument(
            f"{where}: head {step.head!r} is not registered on this server; registered heads: "
            f"{known} (GetServerInfo lists them)"
        )
    if head.model and model and head.model != model:
        raise InvalidArgument(
            f"{where}: head {step.head!r} was fitted for model {head.model!r}, not {model!r}; "
            "use a head registered for this model"
        )
    if step.dim < 0:
        raise InvalidArgument(f"{where}: dim must be >= 0 (0: all components), got {step.dim}")
    if op == "center" and step.dim:
        raise InvalidArgument(f"{where}: dim is for OP_PCA/OP_WHITEN only")
    if step.dim > head.n_components:
        raise InvalidArgument(
            f"{where}: dim {step.dim} is more than the {head.n_components} components of head "
            f"{step.head!r}"
        )
    return PostOp(op, alpha, step.head, step.dim)


def tta_scales(tta: pb.TestTimeAugmentation) -> tuple[float, ...]:
    """Distinct scales in request order (empty: 1), each finite and in TTA_SCALES."""
    scales: list[float] = []
    low, high = TTA_SCALES
    if len(tta.scales) > MAX_TTA_SCALE_ENTRIES:
        raise InvalidArgument(
            f"tta.scales lists {len(tta.scales)} values; at most {MAX_TTA_VIEWS} distinct views "
            f"per image are served, send at most {MAX_TTA_SCALE_ENTRIES} scales"
        )
    for index, scale in enumerate(tta.scales):
        if not math.isfinite(scale) or not low <= scale <= high:
            raise InvalidArgument(
                f"tta.scales[{index}] = {scale} is out of range; scales are finite factors in "
                f"[{low}, {high}] of the preprocessed input (e.g. 1, 0.7071, 0.5)"
            )
        if float(scale) not in scales:  # duplicates collapse: the same view twice adds nothing
            scales.append(float(scale))
    return tuple(scales) or (1.0,)


def output_spec(
    options: pb.OutputOptions, heads: Mapping[str, Head] | None = None, model: str = ""
) -> OutputSpec:
    """OutputOptions -> OutputSpec, refusing (INVALID_ARGUMENT) anything that cannot be served
    before any compute. `heads`: the registered heads; `model`: the request's model."""
    heads = heads or {}
    pool = POOL_NAMES.get(options.pool)
    if pool is None:
        names = ", ".join(f"{pb.Pooling.Name(k)} ({k})" for k in sorted(POOL_NAMES))
        raise InvalidArgument(f"unknown pool value {options.pool}; use one of {names}")
    p = options.gem_p or 3.0
    if not math.isfinite(p) or not 0.1 <= p <= 100:
        raise InvalidArgument(f"gem_p must be a finite number in [0.1, 100], got {options.gem_p}")
    dtype = options.dtype or "float32"
    if dtype not in OUTPUT_DTYPES:
        raise InvalidArgument(
            f"output dtype {dtype[:40]!r} is not supported; use {', '.join(OUTPUT_DTYPES)}"
        )
    if len(options.post) > MAX_POST_STEPS:
        raise InvalidArgument(
            f"post has {len(options.post)} steps, more than {MAX_POST_STEPS}; a chain needs a few "
            "(e.g. OP_POWER, OP_WHITEN)"
        )
    post = tuple(post_op(i, step, heads, model) for i, step in enumerate(options.post))
    levels = options.rmac_levels or 3
    if not RMAC_LEVELS[0] <= levels <= RMAC_LEVELS[1]:
        raise InvalidArgument(
            f"rmac_levels must be in {RMAC_LEVELS[0]}..{RMAC_LEVELS[1]} (0: 3), got "
            f"{options.rmac_levels}"
        )
    roi_size = options.roi_size or 7
    if not ROI_SIZES[0] <= roi_size <= ROI_SIZES[1]:
        raise InvalidArgument(
            f"roi_size must be in {ROI_SIZES[0]}..{ROI_SIZES[1]} (0: 7), got {options.roi_size}"
        )
    flip = options.tta.flip
    scales = tta_scales(options.tta)
    views = len(scales) * (2 if flip else 1)
    if views > MAX_TTA_VIEWS:
        raise InvalidArgument(
            f"tta asks for {views} views ({len(scales)} scales"
            f"{' x 2 with flip' if flip else ''}); at most {MAX_TTA_VIEWS} per image"
        )
    if pool == "raw":
        extras = [
            name
            for name, used in (
                ("post", bool(post)),
                ("concat", options.concat),
                ("tta", views > 1 or scales != (1.0,)),
            )
            if used
        ]
        if extras:
            raise InvalidArgument(
                f"{' and '.join(extras)}: only for pooled outputs, but pool is POOLING_RAW; pick "
                "a pool (e.g. POOLING_GEM)"
            )
    check_name_length(options.concat_key, "concat_key", "it names the concatenated output")
    if options.concat_key and not options.concat:
        raise InvalidArgument("concat_key is set but concat is not; set concat=true or drop it")
    spec = OutputSpec(
        pool=pool,
        gem_p=float(p),
        normalize=options.normalize,
        dtype=dtype,
        post=post,
        concat=options.concat,
        rmac_levels=levels,
        flip=flip,
        scales=scales,
        roi_size=roi_size,
    )
    # L2-normalised at the end: normalize, else the last post op ends in L2, else (no post) a
    # concat (a center step after a concat undoes its L2; TTA averages are not unit vectors)
    if dtype == "int8" and (pool == "raw" or not is_unit_output(spec)):
        what = "raw maps" if pool == "raw" else "this descriptor is not L2-normalised at the end"
        raise InvalidArgument(
            f"dtype int8 quantises L2-normalised pooled descriptors (round(127 x)), but {what}; "
            "use a pool, and set normalize=true, concat=true, or end post with OP_L2, OP_POWER, "
            "OP_PCA or OP_WHITEN"
        )
    check_output(spec, heads)  # pooling's own checks, same rules
    return spec


def descriptor_dims(
    nodes: Sequence[NodeSpec], spec: OutputSpec, heads: Mapping[str, Head]
) -> list[int | None]:
    """Length of each pooled output (one for concat) after the post chain, checking every
    head step against the dimension it would receive (INVALID_ARGUMENT before compute)."""
    if spec.pool == "raw":
        return []
    parts: list[tuple[str, int | None]] = []
    for node in nodes:
        c = node.channels
        parts.append((f"node {node.name!r}", None if c is None else pooled_dim(spec.pool, c)))
    if spec.concat:
        sizes = [d for _, d in parts]
        total = None if None in sizes else sum(d for d in sizes if d is not None)
        parts = [(f"the concatenation of {len(nodes)} nodes", total)]
    dims: list[int | None] = []
    for what, dim in parts:
        for index, step in enumerate(spec.post):
            if step.op not in HEAD_OPS or dim is None:
                continue
            head = heads[step.head]
            if dim != head.input_dim:
                raise InvalidArgument(
                    f"post[{index}] ({step.op}): head {step.head!r} takes {head.input_dim}-d "
                    f"descriptors but {what} pooled with {spec.pool} gives {dim}; use a head "
                    "fitted on the same model, nodes and pool"
                )
            if step.op != "center":
                dim = step.dim or head.n_components
        dims.append(dim)
    return dims
