"""Pooling definitions (docs/DESCRIPTORS.md) on hand-made tensors, every layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layertap.server.errors import InvalidArgument
from layertap.server.heads import Head
from layertap.server.pooling import (
    average_views,
    concat_parts,
    finish,
    finish_raw,
    pool,
    pool_maps,
    rmac_regions,
    roi_pool,
)
from layertap.server.spec import OutputSpec, PostOp, check_output, check_pool, pooled_dim

torch.manual_seed(0)
X = torch.randn(2, 5, 3, 4)  # NCHW


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NLC"])
def test_spatial_pools_agree_across_layouts(layout: str) -> None:
    x = {"NCHW": X, "NHWC": X.permute(0, 2, 3, 1), "NLC": X.flatten(2).transpose(1, 2)}[layout]
    assert torch.allclose(pool(x, layout, OutputSpec("avg")), X.mean((2, 3)), atol=1e-6)
    assert torch.allclose(pool(x, layout, OutputSpec("max")), X.amax((2, 3)))
    gem = X.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
    assert torch.allclose(pool(x, layout, OutputSpec("gem", gem_p=3)), gem, atol=1e-6)


def test_gem_is_stable_for_large_p_and_values() -> None:
    x = X.abs() * 30  # 100th powers overflow float32, not float64
    out = pool(x, "NCHW", OutputSpec("gem", gem_p=100))
    assert torch.isfinite(out).all()
    assert torch.all(out <= x.amax((2, 3)) + 1e-3)
    ref = x.double().clamp(min=1e-6).pow(100).mean((2, 3)).pow(1 / 100)
    assert torch.allclose(out.double(), ref, rtol=1e-4)


def test_token_pools() -> None:
    t = torch.randn(2, 7, 4)
    assert torch.equal(pool(t, "NLC", OutputSpec("cls")), t[:, 0])
    assert torch.allclose(pool(t, "NLC", OutputSpec("mean"), n_prefix=1), t[:, 1:].mean(1))
    assert torch.allclose(pool(t, "NLC", OutputSpec("mean"), n_prefix=0), t.mean(1))


def test_normalize_and_dtype() -> None:
    out = pool(X, "NCHW", OutputSpec("raw", normalize=True, dtype="float16"))
    assert out.dtype == torch.float16 and out.shape == X.shape
    norms = out.float().flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones(2), atol=1e-3)
    zero = pool(torch.zeros(1, 3), "NC", OutputSpec("avg", normalize=True))
    assert torch.isfinite(zero).all()


def test_check_pool_refuses_mismatched_layouts() -> None:
    with pytest.raises(InvalidArgument, match="NLC"):
        check_pool("cls", "NCHW", "layer4")
    with pytest.raises(InvalidArgument, match="unknown"):
        check_pool("gem", "", "weird")
    check_pool("raw", "", "weird")
    check_pool("gem", "NHWC", "features.7")


# --------------------------------------------------------------------------- issue 4 pools

LAYOUTS = ["NCHW", "NHWC", "NLC"]


def _as(layout: str, x: torch.Tensor) -> torch.Tensor:
    """The NCHW tensor x in another layout (same positions, same channels)."""
    return {"NCHW": x, "NHWC": x.permute(0, 2, 3, 1), "NLC": x.flatten(2).transpose(1, 2)}[layout]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_avgmax_and_catavgmax_follow_timm(layout: str) -> None:
    x = _as(layout, X)
    avg, mx = X.mean((2, 3)), X.amax((2, 3))
    got = pool_maps(x, layout, OutputSpec("avgmax"), 0)
    assert torch.allclose(got, 0.5 * (avg + mx), atol=1e-6)
    got = pool_maps(x, layout, OutputSpec("catavgmax"), 0)
    assert got.shape == (2, 10)
    assert torch.allclose(got[:, :5], avg, atol=1e-6) and torch.equal(got[:, 5:], mx)


def test_nc_vectors_pool_to_themselves() -> None:
    v = torch.randn(3, 6)
    for name in ("avg", "max", "gem", "avgmax"):
        ref = v.clamp(min=1e-6) if name == "gem" else v
        assert torch.allclose(pool_maps(v, "NC", OutputSpec(name), 0), ref, atol=1e-6)
    assert torch.equal(pool_maps(v, "NC", OutputSpec("catavgmax"), 0), torch.cat([v, v], 1))


@pytest.mark.parametrize("name", ["avg", "max", "gem", "avgmax", "catavgmax", "rmac", "rgem"])
@pytest.mark.parametrize("hw", [(5, 5), (6, 9), (11, 4)])
def test_nhwc_equals_nchw_of_the_permuted_map(name: str, hw: tuple[int, int]) -> None:
    x = torch.randn(2, 8, *hw)
    spec = OutputSpec(name, gem_p=2.5)
    nchw = pool_maps(x, "NCHW", spec, 0)
    nhwc = pool_maps(x.permute(0, 2, 3, 1).contiguous(), "NHWC", spec, 0)
    assert nchw.dtype == torch.float32 and nchw.shape == (2, pooled_dim(name, 8))
    assert torch.allclose(nchw, nhwc, atol=1e-6)


def test_pools_compute_in_float32_from_half_inputs() -> None:
    x = X.half()
    out = pool_maps(x, "NCHW", OutputSpec("gem"), 0)
    assert out.dtype == torch.float32
    ref = x.float().clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
    assert torch.allclose(out, ref, atol=1e-5)


# R-MAC: the region grid and the descriptor against a plain port of cirtorch's functions
# (cnnimageretrieval-pytorch, cirtorch/layers/functional.py: rmac / roipool, Rpool's aggregation).


def _cirtorch_regions(h: int, w: int, levels: int) -> list[tuple[int, int, int]]:
    ovr = 0.4
    steps = torch.Tensor([2, 3, 4, 5, 6, 7])
    side = min(w, h)
    b = (max(h, w) - side) / (steps - 1)
    _, idx = torch.min(torch.abs(((side**2 - side * b) / side**2) - ovr), 0)
    wd = hd = 0
    if h < w:
        wd = int(idx.item()) + 1
    elif h > w:
        hd = int(idx.item()) + 1
    out = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        wl2 = math.floor(wl / 2 - 1)
        bw = 0 if level + wd == 1 else (w - wl) / (level + wd - 1)
        cen_w = torch.floor(wl2 + torch.Tensor(range(level - 1 + wd + 1)) * bw) - wl2
        bh = 0 if level + hd == 1 else (h - wl) / (level + hd - 1)
        cen_h = torch.floor(wl2 + torch.Tensor(range(level - 1 + hd + 1)) * bh) - wl2
        for i in cen_h.tolist():
            for j in cen_w.tolist():
                if wl == 0:
                    continue
                out.append((int(i), int(j), wl))
    return out


def _regional_reference(
    x: torch.Tensor, levels: int, region_pool: str, p: float = 3.0
) -> torch.Tensor:
    """Global region + every grid region pooled, each L2-normalised, summed, L2-normalised."""

    def rpool(r: torch.Tensor) -> torch.Tensor:
        if region_pool == "max":
            return F.max_pool2d(r, (r.size(-2), r.size(-1))).flatten(1)
        return (
            F.avg_pool2d(r.clamp(min=1e-6).pow(p), (r.size(-2), r.size(-1))).pow(1 / p).flatten(1)
        )

    def l2(v: torch.Tensor) -> torch.Tensor:
        return v / v.norm(dim=1, keepdim=True)

    total = l2(rpool(x))
    for i, j, wl in _cirtorch_regions(x.shape[2], x.shape[3], levels):
        total = total + l2(rpool(x.narrow(2, i, wl).narrow(3, j, wl)))
    return l2(total)


def test_rmac_grid_by_hand() -> None:
    # 7x7, L=3: level 1 one 7x7 region; level 2 side floor(14/3) = 4 at 0 and 3;
    # level 3 side 3 at 0, 2, 4
    grid = rmac_regions(7, 7, 3)
    assert grid[0] == (0, 0, 7)
    assert grid[1:5] == [(t, s, 4) for t in (0, 3) for s in (0, 3)]
    assert grid[5:] == [(t, s, 3) for t in (0, 2, 4) for s in (0, 2, 4)]
    # 7x10: the long side gets one extra region per level (overlap 1 - 3/7 is closest to 40 %)
    wide = rmac_regions(7, 10, 3)
    assert wide[:2] == [(0, 0, 7), (0, 3, 7)]
    assert [r for r in wide if r[2] == 4] == [(t, s, 4) for t in (0, 3) for s in (0, 3, 6)]
    assert len(wide) == 2 + 6 + 12
    tall = rmac_regions(10, 7, 3)
    assert sorted(tall) == sorted((s, t, side) for t, s, side in wide)  # transposed


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (7, 7), (7, 10), (13, 9), (16, 40), (24, 24)])
@pytest.mark.parametrize("levels", [1, 3, 4])
def test_rmac_grid_matches_cirtorch(hw: tuple[int, int], levels: int) -> None:
    assert rmac_regions(*hw, levels) == _cirtorch_regions(*hw, levels)
    for top, left, side in rmac_regions(*hw, levels):
        assert 0 <= top and top + side <= hw[0] and 0 <= left and left + side <= hw[1]


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (7, 7), (9, 14), (15, 6)])
@pytest.mark.parametrize("levels", [1, 3])
def test_rmac_and_rgem_match_the_reference(hw: tuple[int, int], levels: int) -> None:
    x = torch.randn(3, 16, *hw).relu() + 0.01  # post-ReLU maps, no all-zero region
    rmac = pool_maps(x, "NCHW", OutputSpec("rmac", rmac_levels=levels), 0)
    assert torch.allclose(rmac, _regional_reference(x, levels, "max"), atol=1e-5)
    rgem = pool_maps(x, "NCHW", OutputSpec("rgem", gem_p=4.0, rmac_levels=levels), 0)
    assert torch.allclose(rgem, _regional_reference(x, levels, "gem", 4.0), atol=1e-5)
    assert torch.allclose(rmac.norm(dim=1), torch.ones(3), atol=1e-5)
    if levels > 1 and hw != (1, 1):  # with one level a square map is its global region twice
        assert not torch.allclose(rmac, F.normalize(x.amax((2, 3)), dim=1), atol=1e-3)


def test_rmac_levels_change_the_descriptor() -> None:
    x = torch.randn(1, 8, 12, 12).relu()
    one = pool_maps(x, "NCHW", OutputSpec("rmac", rmac_levels=1), 0)
    three = pool_maps(x, "NCHW", OutputSpec("rmac", rmac_levels=3), 0)
    assert not torch.allclose(one, three, atol=1e-4)


def test_rmac_zero_map_stays_finite() -> None:
    out = pool_maps(torch.zeros(1, 4, 6, 6), "NCHW", OutputSpec("rmac"), 0)
    assert torch.equal(out, torch.zeros(1, 4))


def test_token_pools_with_prefix_tokens_and_cls_mean() -> None:
    t = torch.randn(2, 9, 4)  # CLS + 4 registers + 4 patches
    assert torch.allclose(pool_maps(t, "NLC", OutputSpec("mean"), 5), t[:, 5:].mean(1))
    both = pool_maps(t, "NLC", OutputSpec("cls_mean"), 5)
    assert both.shape == (2, 8) and pooled_dim("cls_mean", 4) == 8
    assert torch.equal(both[:, :4], t[:, 0])
    assert torch.allclose(both[:, 4:], t[:, 5:].mean(1))
    assert (
        pooled_dim("gem", 4) == 4 and pooled_dim("catavgmax", 4) == 8 and pooled_dim("rmac", 4) == 4
    )


def test_check_pool_says_what_to_use_instead() -> None:
    with pytest.raises(InvalidArgument, match="use avg, max, gem"):
        check_pool("cls_mean", "NHWC", "features.7")
    with pytest.raises(InvalidArgument, match=r"NCHW or NHWC.*use gem or max, or cls"):
        check_pool("rmac", "NLC", "encoder.ln")
    with pytest.raises(InvalidArgument, match=r"rgem.*'fc' is NC"):
        check_pool("rgem", "NC", "fc")
    with pytest.raises(InvalidArgument, match="unknown pool"):
        check_pool("sum", "NCHW", "layer4")
    for name in ("rmac", "rgem", "avgmax", "catavgmax"):
        check_pool(name, "NHWC", "features.7")
    check_pool("cls_mean", "NLC", "encoder")
    with pytest.raises(InvalidArgument, match="token"):
        pool_maps(X, "NCHW", OutputSpec("cls"), 1)
    with pytest.raises(InvalidArgument, match="NCHW or NHWC"):
        pool_maps(torch.randn(2, 5, 3), "NLC", OutputSpec("rmac"), 1)


# --------------------------------------------------------------------------- roi_pool


def test_roi_whole_map_box_equals_global_pools() -> None:
    # 14x14 map, 7x7 bins of 2x2 pixels, 2 samples per bin side: the aligned samples fall exactly
    # on the pixel centres, so the box over the whole input reproduces the global pools.
    x = torch.randn(2, 6, 14, 14)
    boxes = [torch.tensor([[0.0, 0.0, 56.0, 56.0]]), torch.tensor([[0.0, 0.0, 56.0, 56.0]] * 2)]
    avg = roi_pool(x, "NCHW", boxes, OutputSpec("avg"), (56, 56))
    assert [a.shape for a in avg] == [(1, 6), (2, 6)]
    assert torch.allclose(avg[0], x[:1].mean((2, 3)), atol=1e-5)
    assert torch.allclose(avg[1], x[1:].mean((2, 3)).expand(2, 6), atol=1e-5)
    # each bin is the mean of its samples (here its 2x2 pixels); max pools over the bins
    mx = roi_pool(x, "NCHW", boxes, OutputSpec("max"), (56, 56))
    assert torch.allclose(mx[0], F.avg_pool2d(x[:1], 2).amax((2, 3)), atol=1e-5)


def test_roi_quadrant_box_and_per_axis_scaling() -> None:
    x = torch.randn(1, 4, 28, 28)
    # input 56 x 112 (H x W) → the map is 1/2 of the input vertically, 1/4 horizontally
    box = torch.tensor([[0.0, 0.0, 56.0, 28.0]])  # x2 = 56 → 14 map columns; y2 = 28 → 14 rows
    quad = roi_pool(x, "NCHW", [box], OutputSpec("avg"), (56, 112))[0]
    assert torch.allclose(quad, x[:, :, :14, :14].mean((2, 3)), atol=1e-5)
    assert not torch.allclose(quad, x.mean((2, 3)), atol=1e-2)
    other = torch.tensor([[56.0, 28.0, 112.0, 56.0]])  # bottom-right quadrant
    got = roi_pool(x, "NCHW", [other], OutputSpec("max"), (56, 112))[0]
    assert torch.allclose(got, F.avg_pool2d(x[:, :, 14:, 14:], 2).amax((2, 3)), atol=1e-5)
    nhwc = roi_pool(x.permute(0, 2, 3, 1), "NHWC", [box], OutputSpec("avg"), (56, 112))[0]
    assert torch.allclose(nhwc, quad, atol=1e-6)


def test_roi_whole_box_is_close_to_global_avg_on_any_size() -> None:
    # Smooth map, sizes that do not divide into bins: bilinear sampling ≈ the pixel average.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 9), torch.linspace(0, 1, 11), indexing="ij")
    x = torch.stack([torch.sin(3 * yy) + xx, yy * xx, torch.cos(2 * xx)]).unsqueeze(0)
    got = roi_pool(x, "NCHW", [torch.tensor([[0.0, 0.0, 33.0, 27.0]])], OutputSpec("avg"), (27, 33))
    assert torch.allclose(got[0], x.mean((2, 3)), atol=0.03)


def test_roi_raw_shapes_empty_images_and_bin_pools() -> None:
    x = torch.randn(3, 5, 8, 8)
    boxes = [
        torch.tensor([[0.0, 0, 16, 16], [8, 8, 32, 24]]),
        torch.zeros(0, 4),
        torch.tensor([[4.0, 4, 20, 28]]),
    ]
    raw = roi_pool(x, "NCHW", boxes, OutputSpec("raw", roi_size=4), (32, 32))
    assert [r.shape for r in raw] == [(2, 5, 4, 4), (0, 5, 4, 4), (1, 5, 4, 4)]
    assert all(r.dtype == torch.float32 for r in raw)
    for name in ("gem", "catavgmax", "rmac", "rgem"):
        pooled = roi_pool(x, "NCHW", boxes, OutputSpec(name, roi_size=4), (32, 32))
        assert [p.shape for p in pooled] == [
            (2, pooled_dim(name, 5)),
            (0, pooled_dim(name, 5)),
            (1, pooled_dim(name, 5)),
        ]
        ref = pool_maps(raw[0], "NCHW", OutputSpec(name, roi_size=4), 0)
        assert torch.allclose(pooled[0], ref, atol=1e-6)
    none = roi_pool(x, "NCHW", [torch.zeros(0, 4)] * 3, OutputSpec("avg"), (32, 32))
    assert [n.shape for n in none] == [(0, 5)] * 3


def test_roi_refusals() -> None:
    x = torch.randn(2, 5, 8, 8)
    with pytest.raises(InvalidArgument, match="1 box lists for a batch of 2"):
        roi_pool(x, "NCHW", [torch.zeros(1, 4)], OutputSpec("avg"), (32, 32))
    with pytest.raises(InvalidArgument, match="spatial pool"):
        roi_pool(x, "NCHW", [torch.zeros(1, 4)] * 2, OutputSpec("cls"), (32, 32))
    with pytest.raises(InvalidArgument, match="NCHW or NHWC"):
        roi_pool(torch.randn(2, 5, 3), "NLC", [torch.zeros(1, 4)] * 2, OutputSpec("avg"), (32, 32))


# --------------------------------------------------------------------------- finishing


def _l2(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def _head(d: int = 6, k: int = 4, name: str = "h") -> Head:
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return Head(
        name=name,
        model="",
        mean=torch.randn(d, generator=g),
        components=q.T[:k].contiguous(),
        eigvals=torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1][:k]),
    )


def test_average_views_and_concat_parts() -> None:
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.allclose(average_views([a, b]), (_l2(a) + _l2(b)) / 2, atol=1e-6)
    c = torch.randn(3, 2)
    ref = _l2(torch.cat([_l2(a), _l2(c)], dim=1))
    assert torch.allclose(concat_parts([a, c]), ref, atol=1e-6)
    assert torch.allclose(concat_parts([a]), _l2(a), atol=1e-6)


def test_post_l2_and_signed_power() -> None:
    x = torch.randn(4, 6)
    assert torch.allclose(finish(x, OutputSpec("avg", post=(PostOp("l2"),)), {}), _l2(x), atol=1e-6)
    for alpha in (0.5, 0.3, 1.0):
        got = finish(x, OutputSpec("avg", post=(PostOp("power", alpha=alpha),)), {})
        ref = _l2(torch.sign(x) * torch.abs(x) ** alpha)
        assert torch.allclose(got, ref, atol=1e-6)


def test_post_center_pca_whiten_against_formulas() -> None:
    head = _head()
    heads = {"h": head}
    x = torch.randn(5, 6)
    m, p, lam = head.mean.numpy(), head.components.numpy(), head.eigvals.numpy()
    xn = x.numpy()
    center = finish(x, OutputSpec("avg", post=(PostOp("center", head="h"),)), heads)
    assert torch.allclose(center, torch.from_numpy(xn - m), atol=1e-6)
    for dim in (0, 2):
        k = dim or 4
        proj = (xn - m) @ p[:k].T
        pca = finish(x, OutputSpec("avg", post=(PostOp("pca", head="h", dim=dim),)), heads)
        assert pca.shape == (5, k)
        assert torch.allclose(pca, _l2(torch.from_numpy(proj)), atol=1e-5)
        white = finish(x, OutputSpec("avg", post=(PostOp("whiten", head="h", dim=dim),)), heads)
        assert torch.allclose(white, _l2(torch.from_numpy(proj / np.sqrt(lam[:k]))), atol=1e-5)


def test_post_chain_runs_in_order_then_normalize() -> None:
    head = _head()
    x = torch.randn(5, 6)
    spec = OutputSpec("avg", post=(PostOp("power", alpha=0.5), PostOp("whiten", head="h", dim=3)))
    got = finish(x, spec, {"h": head})
    powered = _l2(torch.sign(x) * x.abs().sqrt())
    ref = _l2(((powered - head.mean) @ head.components[:3].T) / head.eigvals[:3].sqrt())
    assert torch.allclose(got, ref, atol=1e-5)
    centred = finish(
        x, OutputSpec("avg", post=(PostOp("center", head="h"),), normalize=True), {"h": head}
    )
    assert torch.allclose(centred, _l2(x - head.mean), atol=1e-6)


def test_int8_quantisation_rule_and_round_trip() -> None:
    x = torch.randn(8, 32)
    q = finish(x, OutputSpec("avg", normalize=True, dtype="int8"), {})
    unit = _l2(x)
    assert q.dtype == torch.int8
    assert torch.equal(q, torch.round(127 * unit).clamp(-127, 127).to(torch.int8))
    assert (q.float() / 127 - unit).abs().max() <= 0.5 / 127 + 1e-6
    assert int(q.min()) >= -127
    for ok in (
        OutputSpec("avg", concat=True, dtype="int8"),
        OutputSpec("avg", post=(PostOp("power"),), dtype="int8"),
        OutputSpec("avg", post=(PostOp("pca", head="h"),), dtype="int8"),
    ):
        assert finish(torch.randn(2, 6), ok, {"h": _head()}).dtype == torch.int8
    for bad in (
        OutputSpec("avg", dtype="int8"),
        OutputSpec("avg", post=(PostOp("l2"), PostOp("center", head="h")), dtype="int8"),
        OutputSpec("avg", concat=True, post=(PostOp("center", head="h"),), dtype="int8"),
    ):
        with pytest.raises(InvalidArgument, match="int8 needs L2-normalised"):
            finish(torch.randn(2, 6), bad, {"h": _head()})
    with pytest.raises(InvalidArgument, match="raw maps"):
        finish_raw(X, OutputSpec("raw", normalize=True, dtype="int8"))
    with pytest.raises(InvalidArgument, match="raw maps"):
        check_output(OutputSpec("raw", normalize=True, dtype="int8"), {})


def test_finish_dtypes_and_finish_raw() -> None:
    x = torch.randn(3, 6)
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        assert finish(x, OutputSpec("avg", dtype=name), {}).dtype == dtype
    raw = finish_raw(X, OutputSpec("raw", normalize=True))
    assert torch.allclose(raw.flatten(1).norm(dim=1), torch.ones(2), atol=1e-6)
    assert torch.equal(finish_raw(X, OutputSpec("raw")), X)


def test_finish_refusals_name_the_numbers() -> None:
    heads = {"h": _head(d=6, k=4)}
    with pytest.raises(InvalidArgument, match=r"6-d.*9 values"):
        finish(torch.randn(2, 9), OutputSpec("avg", post=(PostOp("pca", head="h"),)), heads)
    with pytest.raises(InvalidArgument, match=r"dim 5 .*4 components"):
        finish(
            torch.randn(2, 6), OutputSpec("avg", post=(PostOp("whiten", head="h", dim=5),)), heads
        )
    with pytest.raises(InvalidArgument, match="unknown head 'nope'; known heads: h"):
        finish(torch.randn(2, 6), OutputSpec("avg", post=(PostOp("pca", head="nope"),)), heads)
    with pytest.raises(InvalidArgument, match="needs a head"):
        finish(torch.randn(2, 6), OutputSpec("avg", post=(PostOp("center"),)), heads)
    with pytest.raises(InvalidArgument, match="alpha must be in"):
        finish(torch.randn(2, 6), OutputSpec("avg", post=(PostOp("power", alpha=1.5),)), heads)
    with pytest.raises(InvalidArgument, match="unknown op 'zca'"):
        finish(torch.randn(2, 6), OutputSpec("avg", post=(PostOp("zca"),)), heads)
    with pytest.raises(InvalidArgument, match="rmac_levels"):
        check_output(OutputSpec("rmac", rmac_levels=0), heads)


def test_pool_keeps_the_one_step_path() -> None:
    # The int8 rule reads the spec, not the values: R-MAC is unit-length, but TTA averaging of
    # unit vectors is not, so int8 still needs normalize (or concat / an L2-ending post step).
    with pytest.raises(InvalidArgument, match="int8"):
        pool(X, "NCHW", OutputSpec("rmac", dtype="int8"))
    out = pool(X, "NCHW", OutputSpec("rmac", normalize=True, dtype="int8"))
    assert out.dtype == torch.int8 and out.shape == (2, 5)
    assert torch.equal(
        out, torch.round(127 * pool_maps(X, "NCHW", OutputSpec("rmac"), 0)).to(torch.int8)
    )
