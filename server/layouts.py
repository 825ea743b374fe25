"""Which dims of a node are channels: NCHW, NHWC (Swin), NLC (tokens), NC, or none, from
shape propagation at two input sizes (the probe: spatial dims follow the image), or, for a
model that fixes its input size, from the graph (what flattens a map, what a channels-first
layer wrote) and the model library's own word (a source's map_layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

# modules whose 4-D output is channels-first by construction
CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_CHANNELS_FIRST_FUNCTIONS = (torch.conv2d, F.conv2d, F.batch_norm, F.max_pool2d, F.avg_pool2d)


def layout_of(base: tuple[int, ...], probe: tuple[int, ...] | None) -> str:
    """Which dims follow the image size decides NCHW vs NHWC vs NLC (probe: larger input)."""
    rank = len(base)
    if rank == 2:
        return "NC"
    spatial = [probe is not None and probe[i] != base[i] for i in range(rank)]
    if rank == 3:  # tokens unless the last dim is the one that follows the image size
        return "" if spatial[2] and not spatial[1] else "NLC"
    if rank == 4:  # channels-first unless there is evidence of NHWC (Swin); 1x1 maps stay NCHW
        if spatial[1] and spatial[2] and not spatial[3]:
            return "NHWC"
        return "" if spatial[1] else "NCHW"
    return ""


def channels_first(node: fx.Node, root: nn.Module) -> bool:
    """Whether the node is the output of a layer that writes channels first (conv, BN, pool)."""
    if node.op == "call_module":
        return isinstance(root.get_submodule(str(node.target)), CHANNELS_FIRST)
    return node.op == "call_function" and node.target in _CHANNELS_FIRST_FUNCTIONS


def flattens_a_map(
    node: fx.Node, base: dict[str, tuple[int, ...]], layouts: dict[fx.Node, str]
) -> bool:
    """Whether a 3-D node [N, C, H*W] is an NCHW input node [N, C, H, W] with its spatial dims
    flattened (`x.reshape(n, c, h * w)`, `x.flatten(2)`): channels first, so not NLC tokens.
    Used when no probe told the spatial dims apart (a model that fixes its input size)."""
    out = base.get(node.name)
    if out is None or len(out) != 3:
        return False
    for source in node.all_input_nodes:
        shape = base.get(source.name)
        if (
            layouts.get(source) == "NCHW"
            and shape is not None
            and len(shape) == 4
            and shape[:2] == out[:2]
            and shape[2] * shape[3] == out[2]
            and shape[2] * shape[3] != shape[1]  # square cases stay ambiguous: keep NLC
        ):
            return True
    return False
