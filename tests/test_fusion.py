"""BatchNorm folding (server/fusion.py): the folded extractor returns what the model computes,
never folds a convolution whose own output is asked for, shares its folded copies and leaves the
model's weights alone."""

from __future__ import annotations

import torch
import torchvision
from torch import fx, nn
from torchvision.ops.misc import Conv2dNormActivation

from layertap.server.catalog import Catalog, build_catalog, build_extractor
from layertap.server.fusion import fold_batchnorms


def _model(channels_last: bool = False) -> nn.Module:
    """resnet18 with BatchNorm statistics far from the identity (random init has mean 0, var 1)."""
    gen = torch.Generator().manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=gen) - 0.5)
    model = model.eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _ext(catalog: Catalog, *names: str) -> fx.GraphModule:
    """An extractor for these names as a client sends them (module names resolve to their
    last node)."""
    return build_extractor(catalog, [catalog.resolve(n) for n in names])


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to float32 rounding: folding reorders the arithmetic, so deep maps (resnet18's
    layer4 reaches ~27 here) differ by a few ulps of their largest values, and which elements
    do depends on the thread count's kernel split. The tolerance is relative to the map's
    scale; a wrong fold (an ignored running mean, a dropped BatchNorm) is off by 1e-1 or more."""
    atol = 2e-6 * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)


def _run(extractor: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return extractor(x)  # type: ignore[no-any-return]


def test_folded_outputs_match_the_model_and_the_conv_asked_for_stays() -> None:
    model = _model()
    catalog = build_catalog(model, (64, 64))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    names = ("bn1", "layer1.0.bn2", "layer2.0.downsample.1", "layer4")
    plain, folded = _ext(catalog, *names), _ext(catalog, *names)
    cache: dict[tuple[str, str], nn.Module] = {}
    # resnet18: the stem's pair, 4 in layer1, 5 in each later stage (one downsample each)
    assert fold_batchnorms(folded, cache) == 20 == len(cache)
    want, got = _run(plain, x), _run(folded, x)
    assert list(got) == list(want)
    for name in want:
        _close(got[name], want[name])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())

    # asked for conv1 itself: conv1 → bn1 stays as it is, the later pairs still fold
    keep = _ext(catalog, "conv1", "bn1", "layer1")
    assert fold_batchnorms(keep, cache) == 4
    out, ref = _run(keep, x), _run(_ext(catalog, "conv1", "bn1", "layer1"), x)
    conv1, bn1, layer1 = out.values()
    assert list(out) == list(ref)
    assert torch.equal(conv1, ref["conv1"]) and torch.equal(bn1, ref["bn1"])
    _close(layer1, ref[catalog.resolve("layer1")])


def test_folded_copies_are_shared_and_the_model_is_untouched() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    catalog = build_catalog(model, (64, 64))
    cache: dict[tuple[str, str], nn.Module] = {}
    first, second = _ext(catalog, "layer2"), _ext(catalog, "layer3")
    fold_batchnorms(first, cache)
    fold_batchnorms(second, cache)
    in_first = [m for m in cache.values() if any(m is f for f in first.modules())]
    assert len(in_first) == 10 and len(cache) == 15  # layer3's reused those ten, added five
    assert all(any(m is f for f in second.modules()) for m in in_first)  # the same objects
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.bn1, nn.BatchNorm2d)


def test_channels_last_models_fold_into_channels_last_weights() -> None:
    model = _model(channels_last=True)
    catalog = build_catalog(model, (64, 64))
    extractor = _ext(catalog, "layer1")
    cache: dict[tuple[str, str], nn.Module] = {}
    fold_batchnorms(extractor, cache)
    for conv in cache.values():
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # type: ignore[operator]
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    (want,), (got,) = _run(_ext(catalog, "layer1"), x).values(), _run(extractor, x).values()
    _close(got, want)


class _Odd(nn.Module):
    """Pairs that must not fold: BN without running statistics, BN in training mode, and a
    BN after a non-convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.act, self.b3 = nn.ReLU(), nn.BatchNorm2d(4)
        self.c4, self.b4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.act(self.b2(self.c2(self.b1(self.c1(x))))))
        return self.b4(self.c4(x))  # type: ignore[no-any-return]


def test_only_eval_batchnorms_with_statistics_after_a_conv_fold() -> None:
    model = _Odd().eval()
    catalog = build_catalog(model, (16, 16))
    extractor = _ext(catalog, "b4")
    model.b2.train()  # (a model would not be served like this; the rule still holds)
    cache: dict[tuple[str, str], nn.Module] = {}
    assert fold_batchnorms(extractor, cache) == 1
    assert list(cache) == [("c4", "b4")]


class _Custom(nn.Sequential):
    """A Sequential with its own forward: not a plain chain, never rewritten."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x


class _Leafy(nn.Module):
    """torchvision's Conv2dNormActivation is traced as one leaf; so is _Custom (a leaf here)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dNormActivation(3, 8, 3)
        self.custom = _Custom(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = Conv2dNormActivation(8, 8, 1, activation_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.custom(self.stem(x)))  # type: ignore[no-any-return]


def test_leaf_sequentials_fold_inside_into_shared_copies() -> None:
    gen = torch.Generator().manual_seed(2)
    model = _Leafy().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(8, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    catalog = build_catalog(model, (16, 16), leaf_modules=(Conv2dNormActivation, _Custom))
    assert [n.name for n in catalog.nodes] == ["stem", "custom", "head"]
    cache: dict[tuple[str, str], nn.Module] = {}
    extractor = _ext(catalog, "stem", "head")
    assert fold_batchnorms(extractor, cache) == 2  # stem's and head's pairs, not _Custom's
    assert _ext(catalog, "stem") is not None and fold_batchnorms(_ext(catalog, "stem"), cache) == 1
    assert cache[("custom", "")] is model.custom  # looked at, left as it is
    assert isinstance(model.stem[1], nn.BatchNorm2d)  # the model itself keeps its BatchNorm
    x = torch.randn(2, 3, 16, 16, generator=gen)
    want, got = _run(_ext(catalog, "stem", "head"), x), _run(extractor, x)
    assert list(got) == list(want) == ["stem", "head"]
    for name in want:
        _close(got[name], want[name])
