"""The extract options both sides name: pools, post ops, dtypes and priorities, with their wire
enums. The server validates against these tables and the client parses into them, so a pool or
op added here reaches both (the proto enum comes first, then one row here)."""

from __future__ import annotations

from typing import Any

import numpy as np

from layertap.v1 import layertap_pb2 as pb

POOL_NAMES: dict[pb.Pooling, str] = {
    pb.POOLING_RAW: "raw",
    pb.POOLING_AVG: "avg",
    pb.POOLING_MAX: "max",
    pb.POOLING_GEM: "gem",
    pb.POOLING_CLS: "cls",
    pb.POOLING_MEAN: "mean",
    pb.POOLING_AVGMAX: "avgmax",
    pb.POOLING_CATAVGMAX: "catavgmax",
    pb.POOLING_RMAC: "rmac",
    pb.POOLING_RGEM: "rgem",
    pb.POOLING_CLS_MEAN: "cls_mean",
}
"""Wire enum -> the pool's name (server/pooling.py implements each; docs/DESCRIPTORS.md)."""
# other spellings clients accept: cls+mean is the DINOv2 paper's
POOL_ALIASES: dict[str, pb.Pooling] = {"cls+mean": pb.POOLING_CLS_MEAN}
SPATIAL_POOLS = ("avg", "max", "gem", "avgmax", "catavgmax", "rmac", "rgem")
"""Pools over the positions of a feature map (and of tokens, except the map-only ones)."""
TOKEN_POOLS = ("cls", "mean", "cls_mean")
MAP_ONLY_POOLS = ("rmac", "rgem")
"""Pools over regions of the map (NCHW / NHWC only): the ones rmac_levels applies to."""

POST_OP_NAMES: dict[pb.PostStep.Op, str] = {
    pb.PostStep.OP_L2: "l2",
    pb.PostStep.OP_POWER: "power",
    pb.PostStep.OP_CENTER: "center",
    pb.PostStep.OP_PCA: "pca",
    pb.PostStep.OP_WHITEN: "whiten",
}
HEAD_OPS = ("center", "pca", "whiten")
"""Post ops that apply a registered head."""
DIM_OPS = ("pca", "whiten")
"""Post ops that keep a number of leading components (dim)."""
UNIT_POST_OPS = ("l2", "power", "pca", "whiten")
"""Post ops whose output is L2-normalised (what dtype int8 needs last)."""
DEFAULT_POWER_ALPHA = 0.5

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
"""Dtypes of raw maps and of GetParameters tensors."""
OUTPUT_DTYPES = (*FLOAT_DTYPES, "int8")
"""Extract output dtypes; int8 is for L2-normalised pooled descriptors only (round(127 x))."""

PRIORITY_NAMES: dict[pb.Priority, str] = {pb.PRIORITY_NORMAL: "normal", pb.PRIORITY_LOW: "low"}

WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "uint8": np.dtype("<u1"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
}
"""Wire dtype -> numpy dtype of the raw little-endian bytes. bfloat16 has no numpy dtype: it is
read as uint16 and widened to float32."""

# The tables as callers, the CLI and the v2 protocols' parameters spell them: name -> wire enum.
POOLING: dict[str, pb.Pooling] = {
    **{name: value for value, name in POOL_NAMES.items()},
    **POOL_ALIASES,
}
POST_OPS: dict[str, pb.PostStep.Op] = {name: value for value, name in POST_OP_NAMES.items()}
POST_FORMS = (
    "'l2', 'power', 'power:ALPHA', 'center:HEAD', 'pca:HEAD', 'pca:HEAD:DIM', 'whiten:HEAD', "
    "'whiten:HEAD:DIM', or a dict {'op': ..., 'alpha': ..., 'head': ..., 'dim': ...}"
)
ENDS_IN_L2 = frozenset(POST_OPS[name] for name in UNIT_POST_OPS)
"""Post ops whose output is L2-normalised (what dtype='int8' needs last)."""
MAP_POOLS = frozenset(POOLING[name] for name in MAP_ONLY_POOLS)
"""Pools over regions of the map: the ones rmac_levels applies to."""
PRIORITIES: dict[str, pb.Priority] = {name: value for value, name in PRIORITY_NAMES.items()}

OUTPUT_OPTION_NAMES = (
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
"""The output options by the names callers give them (option_parsing.build_output_options)."""
REQUEST_OPTION_NAMES = ("priority", "native_resolution", "bypass_result_cache")
"""The ExtractRequest fields besides the images, the model and the nodes that callers set."""
