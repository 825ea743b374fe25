"""Head files (the shared format in common/heads_format.py, the server's server/heads.py):
loading, every refusal on both sides, and PCA / whitening against numpy."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from layertap.client import _whitening as wh
from layertap.common.heads_format import FORMAT, HeadArrays, read_head, write_head
from layertap.server.heads import HEAD_FORMAT, Head, load_head, save_head
from layertap.server.pooling import apply_head, finish
from layertap.server.spec import OutputSpec, PostOp


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


# Every malformed file both readers refuse (the server's load_head and the client's load go
# through the one reader in layertap.common.heads_format), with the reason the message gives.
BAD_FILES: list[tuple[dict[str, Any], str]] = [
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
    ({"nodes": np.array("layer4")}, "'nodes' must be a 1-d string array"),
    ({"pool": np.array(3.0)}, "'pool' must be a 0-d string"),
]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        *BAD_FILES,
        (
            {"model": np.array("vgg16")},
            "fitted on model 'vgg16' but the config binds it to 'resnet50'",
        ),
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


@pytest.mark.parametrize(("overrides", "message"), BAD_FILES)
def test_the_client_refuses_what_the_server_refuses(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    path = _write(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message) as err:
        wh.load(path)
    assert str(err.value).startswith(f"{path}: ")


def test_shared_format_round_trip_and_its_messages(tmp_path: Path) -> None:
    mean, comps, lam = _fit(_data(), 4)
    buf = io.BytesIO()
    write_head(buf, HeadArrays(mean, comps, lam, "m", ("a", "b"), "gem", n_samples=400))
    buf.seek(0)
    back = read_head(buf)
    assert back.mean.dtype == back.components.dtype == back.eigvals.dtype == np.float32
    np.testing.assert_array_equal(back.components, comps.astype(np.float32))
    assert (back.model, back.nodes, back.pool, back.n_samples) == ("m", ("a", "b"), "gem", 400)
    assert FORMAT == HEAD_FORMAT == wh.FORMAT
    # n_samples is optional: not written when not given, None when absent
    write_head(tmp_path / "bare.npz", HeadArrays(mean, comps, lam))
    with np.load(tmp_path / "bare.npz", allow_pickle=False) as npz:
        assert "n_samples" not in npz.files and str(npz["format"]) == FORMAT
    bare = read_head(tmp_path / "bare.npz")
    assert (bare.model, bare.nodes, bare.pool, bare.n_samples) == ("", (), "", None)
    # every message starts with `where` (default: the path)
    bad = _write(tmp_path, n_samples=np.array([3]))
    with pytest.raises(ValueError, match=r"^my head: 'n_samples' must be a 0-d non-negative"):
        read_head(bad, "my head")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))}.missing.npz: file not f"):
        read_head(tmp_path / "missing.npz")


def test_server_written_file_is_read_by_the_client(tmp_path: Path) -> None:
    mean, comps, lam = _fit(_data(), 3)
    save_head(tmp_path / "s.npz", mean, comps, lam, model="m", nodes=["a"], pool="rmac")
    head = wh.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(head.eigvals, lam.astype(np.float32))
    assert (head.model, head.nodes, head.pool, head.n_samples) == ("m", ("a",), "rmac", 0)
    # float64 arrays (the server accepts them) are read as float32 by the client too
    np.savez(tmp_path / "f64.npz", **{**_valid(), "mean": mean.astype(np.float64)})
    assert wh.load(tmp_path / "f64.npz").mean.dtype == np.float32


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
