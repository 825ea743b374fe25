"""Head files (server/heads.py): loading, every refusal, and PCA / whitening against numpy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from layertap.server.heads import HEAD_FORMAT, Head, load_head, save_head
from layertap.server.pooling import OutputSpec, PostOp, apply_head, finish


def _fit(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA by the textbook: mean, top-k eigenvectors of the covariance as rows, eigenvalues."""
    mean = x.mean(0)
    lam, vec = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    order = np.argsort(lam)[::-1][:k]
    return mean, vec[:, order].T, lam[order]


def _data(n: int = 400, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(3, 0.3, d)  # correlated, uneven variances
    return (rng.normal(size=(n, d)) @ mix.T + rng.normal(size=d) * 5).astype(np.float32)


def _valid(**overrides: Any) -> dict[str, Any]:
    mean, comps, lam = _fit(_data(), 5)
    arrays: dict[str, Any] = {
        "format": np.array(HEAD_FORMAT),
        "mean": mean.astype(np.float32),
        "components": comps.astype(np.float32),
        "eigvals": lam.astype(np.float32),
        "model": np.array("resnet50"),
        "nodes": np.array(["layer3", "layer4"]),
        "pool": np.array("gem"),
    }
    arrays.update(overrides)
    return {k: v for k, v in arrays.items() if v is not None}


def _write(tmp_path: Path, **overrides: Any) -> Path:
    path = tmp_path / "head.npz"
    np.savez(path, **_valid(**overrides))
    return path


def test_load_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path)
    head = load_head("gem-white", path)
    assert isinstance(head, Head)
    assert (head.name, head.model, head.nodes, head.pool) == (
        "gem-white",
        "resnet50",
        ("layer3", "layer4"),
        "gem",
    )
    assert head.input_dim == 8 and head.n_components == 5
    assert head.mean.dtype == head.components.dtype == head.eigvals.dtype == torch.float32
    assert torch.equal(head.components, torch.from_numpy(_valid()["components"]))
    assert load_head("x", path, model="resnet50").model == "resnet50"


def test_optional_metadata_and_float64_arrays(tmp_path: Path) -> None:
    v = _valid(model=None, nodes=None, pool=None)
    path = tmp_path / "h.npz"
    np.savez(
        path, **{k: (a.astype(np.float64) if a.dtype.kind == "f" else a) for k, a in v.items()}
    )
    head = load_head("h", path, model="vit_b_16")
    assert head.model == "vit_b_16" and head.nodes == () and head.pool == ""
    assert head.mean.dtype == torch.float32


def test_save_head_writes_what_load_head_reads(tmp_path: Path) -> None:
    mean, comps, lam = _fit(_data(), 3)
    save_head(tmp_path / "s.npz", mean, comps, lam, model="m", nodes=["a"], pool="rmac")
    head = load_head("s", tmp_path / "s.npz")
    assert (head.model, head.nodes, head.pool, head.n_components) == ("m", ("a",), "rmac", 3)
    save_head(tmp_path / "bare.npz", mean, comps, lam)
    assert load_head("b", tmp_path / "bare.npz").nodes == ()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eigvals": None}, "missing key.*eigvals"),
        ({"format": None, "mean": None}, "missing key.*format, mean"),
        ({"format": np.array("layertap-head-v0")}, "format is 'layertap-head-v0'"),
        ({"format": np.array([HEAD_FORMAT])}, "'format' must be a 0-d string"),
        ({"mean": np.zeros((2, 8), np.float32)}, "'mean' must have 1 dimension"),
        ({"mean": np.zeros(7, np.float32)}, r"components has shape \(5, 8\) but mean has 7"),
        ({"components": np.zeros(8, np.float32)}, "'components' must have 2 dimension"),
        ({"eigvals": np.ones(4, np.float32)}, "eigvals has 4 values, components 5 rows"),
        ({"mean": np.full(8, np.nan, np.float32)}, "'mean' holds NaN"),
        ({"components": np.full((5, 8), np.inf, np.float32)}, "'components' holds NaN or inf"),
        ({"mean": np.full(8, 1e300)}, "'mean' holds NaN or infinite values .in float32"),
        ({"eigvals": np.array([3, 2, 1, 0, 0], np.float32)}, "eigvals must all be > 0"),
        ({"eigvals": np.array([3, 2, 1, 1, -1], np.float32)}, r"smallest is -1\.0"),
        ({"eigvals": np.array([1, 2, 3, 4, 5], np.float32)}, "descending"),
        ({"mean": np.zeros(8, np.int64)}, "'mean' must be a floating-point array"),
        (
            {"components": np.ones((9, 8), np.float32), "eigvals": np.ones(9, np.float32)},
            "9 rows, more than the dimension 8",
        ),
        (
            {"model": np.array("vgg16")},
            "fitted on model 'vgg16' but the config binds it to 'resnet50'",
        ),
        ({"nodes": np.array("layer4")}, "'nodes' must be a 1-d string array"),
        ({"pool": np.array(3.0)}, "'pool' must be a 0-d string"),
    ],
)
def test_bad_files_are_refused_with_the_reason(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    path = _write(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message) as err:
        load_head("bad", path, model="resnet50")
    assert str(path) in str(err.value) and "'bad'" in str(err.value)


def test_pickled_object_arrays_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, nodes=np.array([{"evil": 1}, "layer4"], dtype=object))
    with pytest.raises(ValueError, match="'nodes' cannot be read without pickle"):
        load_head("bad", path)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file not found"):
        load_head("x", tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a numpy file")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        load_head("x", junk)
    npy = tmp_path / "mean.npy"
    np.save(npy, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"single \.npy array"):
        load_head("x", npy)


def test_pca_and_whitening_match_numpy_and_whiten_the_training_data(tmp_path: Path) -> None:
    x = _data(n=2000, d=8, seed=3)
    mean, comps, lam = _fit(x, 8)
    save_head(tmp_path / "w.npz", mean, comps, lam)
    head = load_head("w", tmp_path / "w.npz")
    xt = torch.from_numpy(x)

    white = apply_head(xt, head, "whiten").numpy()
    assert np.allclose(np.cov(white, rowvar=False), np.eye(8), atol=1e-3)
    assert np.allclose(white.mean(0), 0, atol=1e-3)

    pca = apply_head(xt, head, "pca", dim=3).numpy()
    assert pca.shape == (2000, 3)
    assert np.allclose(pca, (x - mean) @ comps[:3].T, atol=1e-3)
    assert np.allclose(np.cov(pca, rowvar=False), np.diag(lam[:3]), rtol=1e-3, atol=1e-2)

    # finish: the same projection, then L2
    got = finish(xt[:10], OutputSpec("avg", post=(PostOp("whiten", head="w", dim=4),)), {"w": head})
    ref = ((x[:10] - mean) @ comps[:4].T) / np.sqrt(lam[:4])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.allclose(got.numpy(), ref, atol=1e-5)
