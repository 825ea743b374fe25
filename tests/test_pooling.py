"""Pooling definitions (DESIGN-NOTES §4) on hand-made tensors, every layout."""

from __future__ import annotations

import pytest
import torch

from layertap.server.errors import InvalidArgument
from layertap.server.pooling import OutputSpec, check_pool, pool

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
