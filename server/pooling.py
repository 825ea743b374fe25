"""Pooled descriptors from activations: pure tensor → tensor functions.

x is one batch of a node's output; the layout says where channels and positions are. The worker
thread pools (pool_maps / roi_pool, float32); the finish stage averages TTA views, concatenates
parts and runs the post chain (finish). Definitions: docs/DESCRIPTORS.md (eps = 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .errors import InvalidArgument
from .heads import Head
from .spec import (
    HEAD_OPS,
    MAP_ONLY_POOLS,
    OUTPUT_DTYPES,
    ROI_POOLS,
    TOKEN_POOLS,
    OutputSpec,
    PostOp,
    check_output,
    head_for,
    pooled_dim,
)

EPS = 1e-6  # GeM clamp
L2_EPS = 1e-12  # F.normalize: a zero vector stays zero instead of becoming NaN
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RMAC_OVERLAP = 0.4  # desired overlap of neighbouring regions (Tolias et al.)
RMAC_STEPS = (2, 3, 4, 5, 6, 7)  # candidate region counts along the long side


# --------------------------------------------------------------------------- pools


def _to_nc_positions(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Any supported layout → [N, C, P] (P positions or tokens)."""
    if layout == "NCHW":
        return x.flatten(2)
    if layout == "NHWC":
        return x.flatten(1, 2).transpose(1, 2)
    if layout == "NLC":
        return x.transpose(1, 2)
    if layout == "NC":
        return x.unsqueeze(-1)
    raise InvalidArgument(f"cannot pool layout {layout!r}")


def _to_nchw(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "NCHW":
        return x
    if layout == "NHWC":
        return x.permute(0, 3, 1, 2)
    raise InvalidArgument(f"this pooling needs a NCHW or NHWC feature map, not {layout!r}")


def gem(pos: torch.Tensor, p: float) -> torch.Tensor:
    """GeM over the last dim, `x.clamp(min=eps).pow(p).mean().pow(1/p)`, computed relative to
    the max so that large p or large activations do not overflow float32."""
    x = pos.clamp(min=EPS)
    scale = x.amax(-1, keepdim=True)
    return (x / scale).pow(p).mean(-1).pow(1.0 / p) * scale.squeeze(-1)


def _pool_positions(pos: torch.Tensor, spec: OutputSpec) -> torch.Tensor:
    """[N, C, P] → [N, D] for the global spatial pools (not the region ones)."""
    if spec.pool == "avg":
        return pos.mean(-1)
    if spec.pool == "max":
        return pos.amax(-1)
    if spec.pool == "gem":
        return gem(pos, spec.gem_p)
    if spec.pool == "avgmax":
        return 0.5 * (pos.mean(-1) + pos.amax(-1))
    if spec.pool == "catavgmax":
        return torch.cat([pos.mean(-1), pos.amax(-1)], dim=1)
    raise InvalidArgument(f"unknown pool {spec.pool!r}")


def rmac_regions(h: int, w: int, levels: int) -> list[tuple[int, int, int]]:
    """The R-MAC region grid as (top, left, side), global region excluded, exactly as cirtorch's
    `rmac` / `roipool`: square regions of side floor(2·min(H,W)/(l+1)) at level l, l·l regions
    (plus extra ones along the long side) spaced so neighbours overlap by ~40 %."""
    side_min = min(h, w)
    extra_w = extra_h = 0
    if h != w:
        # extra regions along the long side: the count whose overlap is closest to RMAC_OVERLAP
        # (float32 and first minimum, as cirtorch)
        steps = torch.tensor(RMAC_STEPS, dtype=torch.float32)
        spacing = (max(h, w) - side_min) / (steps - 1)
        err = torch.abs((side_min**2 - side_min * spacing) / side_min**2 - RMAC_OVERLAP)
        extra = int(torch.argmin(err).item()) + 1
        if h < w:
            extra_w = extra
        else:
            extra_h = extra
    regions: list[tuple[int, int, int]] = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * side_min / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        starts = []
        for n, extent in ((level + extra_h, h), (level + extra_w, w)):
            b = 0.0 if n == 1 else (extent - wl) / (n - 1)
            # cirtorch computes the centres in float32; do the same so the grid matches exactly
            cen = torch.floor(wl2 + torch.arange(n, dtype=torch.float32) * b) - wl2
            starts.append([int(c) for c in cen.tolist()])
        regions.extend((top, left, wl) for top in starts[0] for left in starts[1])
    return regions


def _regional(x: torch.Tensor, spec: OutputSpec) -> torch.Tensor:
    """R-MAC / R-GeM of an NCHW map: each region (global one included) max- or GeM-pooled and
    L2-normalised, summed, and the sum L2-normalised."""

    def region_pool(r: torch.Tensor) -> torch.Tensor:
        flat = r.flatten(2)
        return flat.amax(-1) if spec.pool == "rmac" else gem(flat, spec.gem_p)

    total = F.normalize(region_pool(x), dim=-1, eps=L2_EPS)
    for top, left, side in rmac_regions(x.shape[2], x.shape[3], spec.rmac_levels):
        region = x[:, :, top : top + side, left : left + side]
        total = total + F.normalize(region_pool(region), dim=-1, eps=L2_EPS)
    return F.normalize(total, dim=-1, eps=L2_EPS)


def _pool_map(x: torch.Tensor, spec: OutputSpec) -> torch.Tensor:
    """Float32 NCHW map → [N, D] with a spatial pool."""
    if spec.pool in MAP_ONLY_POOLS:
        return _regional(x, spec)
    return _pool_positions(x.flatten(2), spec)


def pool_maps(x: torch.Tensor, layout: str, spec: OutputSpec, n_prefix: int) -> torch.Tensor:
    """Pool a [N, ...] activation to float32 [N, D] (spec.pool != raw). No normalisation (R-MAC
    and R-GeM are unit vectors by definition), no dtype change."""
    xf = x.float()
    p = spec.pool
    if p == "raw":
        raise InvalidArgument("pool_maps needs a pooling; raw outputs go through finish_raw")
    if p in TOKEN_POOLS:
        if layout != "NLC":
            raise InvalidArgument(f"pool '{p}' needs a token output (NLC), not {layout!r}")
        cls = xf[:, 0]
        if p == "cls":
            return cls
        patches = xf[:, n_prefix:] if xf.shape[1] > n_prefix else xf  # no patch tokens: all
        mean = patches.mean(1)
        return mean if p == "mean" else torch.cat([cls, mean], dim=1)
    if p in MAP_ONLY_POOLS:
        return _regional(_to_nchw(xf, layout), spec)
    return _pool_positions(_to_nc_positions(xf, layout), spec)


def roi_pool(
    x: torch.Tensor,
    layout: str,
    boxes: list[torch.Tensor],
    spec: OutputSpec,
    input_hw: tuple[int, int],
) -> list[torch.Tensor]:
    """Region descriptors of one batch: boxes[i] is float [R_i, 4] (x1, y1, x2, y2) in model-input
    pixels of image i, input_hw the batch's input (H, W). roi_align (aligned, sampling_ratio=2)
    samples each box on a roi_size × roi_size grid of the map; raw → float32 [R_i, C, s, s],
    otherwise the bins are pooled with spec.pool → float32 [R_i, D]."""
    if spec.pool in TOKEN_POOLS:
        raise InvalidArgument(f"pool '{spec.pool}' is for tokens; regions need a spatial pool")
    if spec.pool != "raw" and spec.pool not in ROI_POOLS:
        raise InvalidArgument(f"unknown pool {spec.pool!r}")
    fmap = _to_nchw(x.float(), layout).contiguous()
    n, c, h, w = fmap.shape
    if len(boxes) != n:
        raise InvalidArgument(f"{len(boxes)} box lists for a batch of {n} images")
    in_h, in_w = input_hw
    scale = torch.tensor([w / in_w, h / in_h, w / in_w, h / in_h], device=fmap.device)
    counts = [int(b.shape[0]) for b in boxes]
    size = spec.roi_size
    if sum(counts) == 0:
        bins = fmap.new_zeros((0, c, size, size))
    else:
        scaled = [
            b.to(device=fmap.device, dtype=torch.float32).reshape(-1, 4) * scale for b in boxes
        ]
        bins = roi_align(
            fmap, scaled, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )
    if spec.pool == "raw":
        out = bins
    elif bins.shape[0] == 0:
        out = bins.new_zeros((0, pooled_dim(spec.pool, c)))
    else:
        out = _pool_map(bins, spec)
    return list(out.split(counts))


# --------------------------------------------------------------------------- finishing


def l2n(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise over the last dim (a zero vector stays zero)."""
    return F.normalize(x, p=2, dim=-1, eps=L2_EPS)


def average_views(views: list[torch.Tensor]) -> torch.Tensor:
    """Test-time augmentation: L2-normalise each view's [.., D] descriptor, then average."""
    if not views:
        raise InvalidArgument("no views to average")
    return torch.stack([l2n(v.float()) for v in views]).mean(0)


def concat_parts(parts: list[torch.Tensor]) -> torch.Tensor:
    """Multi-node descriptor: L2 each part [.., D_i], concatenate in order, L2 the whole."""
    if not parts:
        raise InvalidArgument("no parts to concatenate")
    return l2n(torch.cat([l2n(p.float()) for p in parts], dim=-1))


def apply_head(x: torch.Tensor, head: Head, op: str, dim: int = 0) -> torch.Tensor:
    """A head op before its final L2: center → x − m; pca → P[:d](x − m);
    whiten → diag(λ[:d])^-½ P[:d](x − m). x is float32 [.., D]."""
    if x.shape[-1] != head.input_dim:
        raise InvalidArgument(
            f"head {head.name!r} takes {head.input_dim}-d descriptors but this one has "
            f"{x.shape[-1]} values; use a head fitted on the same model, nodes and pool"
        )
    if dim < 0 or dim > head.n_components:
        raise InvalidArgument(
            f"dim {dim} is out of range for head {head.name!r}: it has {head.n_components} "
            "components (0 = all)"
        )
    centred = x - head.mean.to(x.device)
    if op == "center":
        return centred
    k = dim or head.n_components
    projected = centred @ head.components[:k].to(x.device).T
    if op == "pca":
        return projected
    if op == "whiten":
        return projected * head.eigvals[:k].to(x.device).rsqrt()
    raise InvalidArgument(f"unknown head op {op!r}; use {', '.join(HEAD_OPS)}")


def _post_step(x: torch.Tensor, step: PostOp, heads: Mapping[str, Head]) -> torch.Tensor:
    if step.op == "l2":
        return l2n(x)
    if step.op == "power":
        return l2n(x.sign() * x.abs().pow(step.alpha))
    head = head_for(step, heads, f"post step {step.op}")
    out = apply_head(x, head, step.op, step.dim)
    return out if step.op == "center" else l2n(out)


def _to_dtype(x: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "int8":
        return torch.round(127.0 * x).clamp(-127, 127).to(torch.int8)
    if dtype not in DTYPES:
        raise InvalidArgument(
            f"output dtype {dtype!r} is not supported; use {', '.join(OUTPUT_DTYPES)}"
        )
    return x.to(DTYPES[dtype])


def finish(x: torch.Tensor, spec: OutputSpec, heads: Mapping[str, Head]) -> torch.Tensor:
    """Pooled [.., D] → post chain in order → `normalize` L2 → dtype (int8: round(127 x), only
    for L2-normalised vectors)."""
    check_output(spec, heads)
    out = x.float()
    for step in spec.post:
        out = _post_step(out, step, heads)
    if spec.normalize:
        out = l2n(out)
    return _to_dtype(out, spec.dtype)


def finish_raw(x: torch.Tensor, spec: OutputSpec) -> torch.Tensor:
    """Raw [N, ...] maps: L2 over all of each item's elements if `normalize`, then dtype."""
    if spec.dtype == "int8":
        raise InvalidArgument(
            "dtype int8 is for pooled, L2-normalised descriptors; raw maps use float32, "
            "float16 or bfloat16"
        )
    out = x
    if spec.normalize:
        flat = x.float().flatten(1)
        out = F.normalize(flat, p=2, dim=1, eps=L2_EPS).reshape(x.shape)
    return _to_dtype(out, spec.dtype)


def pool(x: torch.Tensor, layout: str, spec: OutputSpec, n_prefix: int = 1) -> torch.Tensor:
    """Pool and finish one activation without heads (the one-step path of earlier callers)."""
    if spec.pool == "raw":
        return finish_raw(x, spec)
    return finish(pool_maps(x, layout, spec, n_prefix), spec, {})
