"""Folding each eval-mode BatchNorm into the convolution before it, inside one extractor's graph.

A BatchNorm in eval mode is a fixed per-channel affine map, so conv → BN equals one convolution
with scaled weights and a shifted bias (torch.nn.utils.fusion.fuse_conv_bn_eval). On the CPU the
separate BN pass is a large share of a CNN's forward, and more so in channels-last memory
format (measured on the 2-core CPU, docs/BENCHMARKS.md). The values agree with the unfolded
graph to float32 rounding (~1e-6 relative).

Rules that keep every served value what the model computes:
- only a convolution whose output has no other user is folded: when a request asks for the
  convolution's own output, that extractor keeps the pair as it is;
- the BN node's output (what a request for the BN node returns) becomes the folded
  convolution's output, the same value;
- the folded copies are built once per model and shared by its extractors (the cache passed
  in), never written into the model: GetParameters and other extractors see the originals.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorms"]

_PAIRS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
)
_PREFIX = "layertap_folded_"


def _foldable(conv: nn.Module | None, bn: nn.Module | None) -> bool:
    if conv is None or bn is None or conv.training or bn.training:
        return False
    if not any(type(conv) is c and type(bn) is b for c, b in _PAIRS):
        return False
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    return bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None


def _fold(conv: nn.Module, bn: nn.Module) -> nn.Module:
    assert isinstance(conv, nn.modules.conv._ConvNd)
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    fused = fuse_conv_bn_eval(conv, bn).eval()
    weight = conv.weight
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        fused = fused.to(memory_format=torch.channels_last)  # as the model's own
    return fused


def _folded_sequential(seq: nn.Sequential) -> nn.Sequential | None:
    """A copy of a Sequential traced as one leaf (torchvision's Conv2dNormActivation: conv,
    BN, activation) with each conv → BN pair in it folded; None when nothing folds. Its
    inside is not a graph node, so no request can ask for the convolution's own output."""
    if type(seq).forward is not nn.Sequential.forward:
        return None  # a subclass with its own forward: not a plain chain
    children = list(seq.named_children())
    out: list[tuple[str, nn.Module]] = []
    changed = False
    i = 0
    while i < len(children):
        name, child = children[i]
        if i + 1 < len(children) and _foldable(child, children[i + 1][1]):
            out += [(name, _fold(child, children[i + 1][1])), (children[i + 1][0], nn.Identity())]
            changed = True
            i += 2
            continue
        out.append((name, child))  # shared, not copied
        i += 1
    return nn.Sequential(OrderedDict(out)).eval() if changed else None


def _attach(gm: fx.GraphModule, target: str, module: nn.Module) -> str:
    """Register the folded copy of module `target` on `gm`; returns its name there."""
    name = _PREFIX + target.replace(".", "_")
    gm.add_submodule(name, module)
    return name


def fold_batchnorms(gm: fx.GraphModule, cache: dict[tuple[str, str], nn.Module]) -> int:
    """Rewrite `gm` in place: each foldable conv → BN pair becomes one call of a folded copy
    (from `cache`, keyed by the two module names, built on first use), and each leaf
    Sequential holding such pairs a call of its folded copy (keyed by its name and "").
    Returns the number of pairs folded."""
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        leaf = modules.get(str(node.target))
        if isinstance(leaf, nn.Sequential):
            key = (str(node.target), "")
            if key not in cache:
                cache[key] = _folded_sequential(leaf) or leaf
            if cache[key] is not leaf:
                node.target = _attach(gm, key[0], cache[key])
                pairs = zip(leaf.children(), cache[key].children(), strict=True)
                folded += sum(a is not b and isinstance(b, nn.Identity) for a, b in pairs)
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        if len(source.users) != 1 or source.kwargs:
            continue  # the convolution's own output is used elsewhere (or returned)
        conv, bn = modules.get(str(source.target)), modules.get(str(node.target))
        if not _foldable(conv, bn):
            continue
        key = (str(source.target), str(node.target))
        fused = cache.get(key)
        if fused is None:
            assert conv is not None and bn is not None
            fused = cache[key] = _fold(conv, bn)
        source.target = _attach(gm, key[0], fused)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return folded
