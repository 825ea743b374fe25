"""Pooled descriptors from activations: pure tensor → tensor functions, run on the worker thread.

x is one batch of a node's output; the layout says where channels and positions are.
Definitions follow DESIGN-NOTES §4 (eps = 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InvalidArgument

EPS = 1e-6
SPATIAL_POOLS = ("avg", "max", "gem")
TOKEN_POOLS = ("cls", "mean")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class OutputSpec:
    """What a request wants done to each activation after the forward."""

    pool: str = "raw"  # raw | avg | max | gem | cls | mean
    gem_p: float = 3.0
    normalize: bool = False
    dtype: str = "float32"


def check_pool(pool: str, layout: str, node: str) -> None:
    """Refuse a pooling that the node's layout cannot support (before any compute)."""
    if pool == "raw":
        return
    if pool in TOKEN_POOLS and layout != "NLC":
        raise InvalidArgument(
            f"pool '{pool}' needs a token output (layout NLC); node {node!r} is "
            f"{layout or 'unknown'}; use avg, max or gem for feature maps"
        )
    if pool in SPATIAL_POOLS and layout not in ("NCHW", "NHWC", "NLC", "NC"):
        raise InvalidArgument(
            f"pool '{pool}' cannot pool node {node!r}: its layout is unknown; request raw output"
        )


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


def gem(pos: torch.Tensor, p: float) -> torch.Tensor:
    """GeM over the last dim, `x.clamp(min=eps).pow(p).mean().pow(1/p)`, computed relative to
    the max so that large p or large activations do not overflow float32."""
    x = pos.clamp(min=EPS)
    scale = x.amax(-1, keepdim=True)
    return (x / scale).pow(p).mean(-1).pow(1.0 / p) * scale.squeeze(-1)


def pool(x: torch.Tensor, layout: str, spec: OutputSpec, n_prefix: int = 1) -> torch.Tensor:
    """Pool a [N, ...] activation to [N, C] (or return it as is for raw), compute in float32."""
    if spec.pool == "raw":
        out = x
    else:
        xf = x.float()
        if spec.pool == "cls":
            out = xf[:, 0]
        elif spec.pool == "mean":
            out = xf[:, n_prefix:].mean(1) if xf.shape[1] > n_prefix else xf.mean(1)
        else:
            pos = _to_nc_positions(xf, layout)
            if spec.pool == "avg":
                out = pos.mean(-1)
            elif spec.pool == "max":
                out = pos.amax(-1)
            elif spec.pool == "gem":
                out = gem(pos, spec.gem_p)
            else:
                raise InvalidArgument(f"unknown pool {spec.pool!r}")
    if spec.normalize:
        flat = out.float().flatten(1)
        out = F.normalize(flat, p=2, dim=1, eps=1e-12).reshape(out.shape)
    return out.to(DTYPES[spec.dtype])
