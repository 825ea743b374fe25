"""PCA / PCA-whitening heads: the numpy fit against a numpy reference, the head file, and
``layertap fit-whitening`` over real photos through a real server."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import RunningServer, photo, start_server
from PIL import Image

from layertap.client import FeatureClient
from layertap.client import _whitening as wh
from layertap.client.cli import main
from layertap.server.settings import HeadConfig, ModelConfig, Settings


def _correlated(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n samples of a d-dim Gaussian with a strongly non-isotropic covariance and a mean."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.geomspace(3.0, 0.2, d)[None, :]
    return rng.normal(size=(n, d)) @ mix.T + rng.normal(size=d) * 2


def _reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mean, eigenvalues (descending) and eigenvectors (columns) of np.cov."""
    eig, vecs = np.linalg.eigh(np.cov(x, rowvar=False))
    order = np.argsort(eig)[::-1]
    return x.mean(0), eig[order], vecs[:, order]


@pytest.mark.parametrize(("n", "d"), [(400, 12), (9, 30)])  # covariance path, Gram path
def test_fit_matches_numpy_reference(n: int, d: int) -> None:
    x = _correlated(n, d)
    head = wh.fit(x)
    mean, eig, vecs = _reference(x)
    k = min(n - 1, d)
    assert head.n_components == k and head.input_dim == d
    np.testing.assert_allclose(head.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.eigvals, eig[:k], rtol=1e-4)
    # the same axes up to sign
    dots = np.abs(np.sum(head.components.astype(np.float64) * vecs[:, :k].T, axis=1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-4)
    # orthonormal rows, eigenvalues descending and positive
    np.testing.assert_allclose(head.components @ head.components.T, np.eye(k), atol=1e-5)
    assert np.all(np.diff(head.eigvals) <= 0) and np.all(head.eigvals > 0)
    assert head.variance_kept == pytest.approx(eig[:k].sum() / eig.sum(), rel=1e-4)


def test_whitened_training_data_has_identity_covariance() -> None:
    x = _correlated(500, 16, seed=1)
    head = wh.fit(x)
    y = (x - head.mean) @ head.components.T / np.sqrt(head.eigvals)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(16), atol=1e-3)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    # truncated: the leading block is still the identity
    head8 = wh.fit(x, dim=8)
    y8 = (x - head8.mean) @ head8.components.T / np.sqrt(head8.eigvals)
    np.testing.assert_allclose(np.cov(y8, rowvar=False), np.eye(8), atol=1e-3)


def test_transform_is_projection_whitening_then_l2() -> None:
    x = _correlated(60, 10, seed=2)
    head = wh.fit(x)
    q = x[:5]
    pca = (q - head.mean) @ head.components[:4].T
    np.testing.assert_allclose(head.transform(q, whiten=False, dim=4), wh.l2_normalize(pca), 1e-5)
    white = pca / np.sqrt(head.eigvals[:4])
    np.testing.assert_allclose(head.transform(q, dim=4), wh.l2_normalize(white), rtol=1e-5)
    assert np.allclose(np.linalg.norm(head.transform(q), axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="fitted on 10-d"):
        head.transform(np.zeros((1, 11)))
    with pytest.raises(ValueError, match="out of range"):
        head.transform(q, dim=11)


def test_shrinkage_moves_eigenvalues_towards_the_mean_variance() -> None:
    x = _correlated(50, 20, seed=3)
    plain, shrunk = wh.fit(x), wh.fit(x, shrinkage=0.3)
    mean_var = np.trace(np.cov(x, rowvar=False)) / 20
    np.testing.assert_allclose(shrunk.eigvals, 0.7 * plain.eigvals + 0.3 * mean_var, rtol=1e-5)
    np.testing.assert_array_equal(shrunk.components, plain.components)  # axes unchanged
    assert shrunk.eigvals[0] / shrunk.eigvals[-1] < plain.eigvals[0] / plain.eigvals[-1]


def test_rank_deficient_data_keeps_only_real_axes() -> None:
    # 3 distinct images among 6 (duplicates): 2 directions of variance around the mean
    base = _correlated(3, 8, seed=4)
    x = np.concatenate([base, base])
    head = wh.fit(x)
    assert head.n_components == 2 and np.all(head.eigvals > 0)
    with pytest.raises(ValueError, match="vary in only 2 directions"):
        wh.fit(x, dim=4)


def test_fit_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        wh.fit(np.ones((1, 5)))
    with pytest.raises(ValueError, match=r"min\(n - 1, D\) = 4"):
        wh.fit(_correlated(5, 8), dim=5)
    with pytest.raises(ValueError, match=r"min\(n - 1, D\) = 3"):
        wh.fit(_correlated(20, 3), dim=4)
    with pytest.raises(ValueError, match="identical"):
        wh.fit(np.ones((4, 3)))
    bad = _correlated(5, 3)
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        wh.fit(bad)
    with pytest.raises(ValueError, match="shrinkage"):
        wh.fit(_correlated(5, 3), shrinkage=1.5)
    with pytest.raises(ValueError, match="2-d"):
        wh.fit(np.ones(5))


def test_head_file_round_trip_and_server_reader(tmp_path: Path) -> None:
    from layertap.server.heads import load_head

    head = wh.fit(_correlated(40, 6), dim=5, model="m", nodes=("a", "b.c"), pool="gem")
    path = tmp_path / "h.npz"
    wh.save(head, path)
    back = wh.load(path)
    for name in ("mean", "components", "eigvals"):
        np.testing.assert_array_equal(getattr(back, name), getattr(head, name))
        assert getattr(back, name).dtype == np.float32
    assert (back.model, back.nodes, back.pool, back.n_samples) == ("m", ("a", "b.c"), "gem", 40)
    with np.load(path, allow_pickle=False) as npz:  # the contract's format, no pickle
        assert str(npz["format"]) == "layertap-head-v1" and npz["format"].ndim == 0
        assert npz["nodes"].ndim == 1 and npz["model"].ndim == 0 and npz["pool"].ndim == 0
    served = load_head("h", path, model="m")
    np.testing.assert_array_equal(served.components.numpy(), head.components)
    assert served.nodes == ("a", "b.c") and served.pool == "gem"
    # no nodes at all still reads on both sides
    wh.save(wh.fit(_correlated(10, 3)), path)
    assert wh.load(path).nodes == () and load_head("h", path).nodes == ()


def test_load_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, mean=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="missing"):
        wh.load(path)
    head = wh.fit(_correlated(10, 3))
    buf = io.BytesIO()
    wh.save(head, buf)
    buf.seek(0)
    arrays = dict(np.load(buf, allow_pickle=False))
    np.savez(path, **{**arrays, "format": np.asarray("other-v9")})
    with pytest.raises(ValueError, match="other-v9"):
        wh.load(path)
    np.savez(path, **{**arrays, "eigvals": arrays["eigvals"][::-1].copy()})
    with pytest.raises(ValueError, match="descending"):
        wh.load(path)
    np.savez(path, **{**arrays, "components": arrays["components"][:, :2].copy()})
    with pytest.raises(ValueError, match="disagree"):
        wh.load(path)


# --------------------------------------------------------------------------- the command


def _tiles(root: Path, count: int) -> list[Path]:
    """Tiles of real photos (not whole photos: a retrieval index's photos stay unseen)."""
    paths = []
    names = ("astronaut", "coffee", "rocket", "china", "grace_hopper")
    for i in range(count):
        img = photo(names[i % len(names)])
        h, w = img.shape[:2]
        k = i // len(names)
        y, x = (k * 37) % (h // 2), (k * 53) % (w // 2)
        path = root / f"tile_{i:02d}.png"
        Image.fromarray(img[y : y + h // 2, x : x + w // 2]).save(path)
        paths.append(path)
    return paths


def check_served_whitening(head_file: Path, images: list[Path], x: np.ndarray) -> None:
    """A server with the head registered whitens the L2-normalised GeM descriptors ``x`` of
    ``images`` as the formula says: y = l2(((x - mean) V_k) / sqrt(eig_k)), and ``pca:`` is
    l2((x - mean) V_k), with mean, V and eig from the test's own eigendecomposition. Each axis'
    sign is free (an eigenvector's sign is arbitrary): it is read off the served answer."""
    mean, eig, vecs = _reference(x)
    settings = Settings(
        port=0,
        metrics=False,
        log_level="ERROR",
        models=(ModelConfig(name="mobilenet_v2", arch="mobilenet_v2", weights="IMAGENET1K_V1"),),
        heads=(HeadConfig(name="tiles", file=str(head_file), model="mobilenet_v2"),),
    )
    running = start_server(settings)
    try:
        with FeatureClient(running.target) as client:
            served = {
                post: client.extract(
                    [str(p) for p in images],
                    model="mobilenet_v2",
                    nodes="features",
                    pool="gem",
                    post=["l2", post],
                )["features"].astype(np.float64)
                for post in ("whiten:tiles", "whiten:tiles:5", "pca:tiles:4")
            }
    finally:
        running.stop()

    def l2(y: np.ndarray) -> np.ndarray:
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    projected = (x - mean) @ vecs
    expected = {
        "whiten:tiles": l2(projected[:, :8] / np.sqrt(eig[:8])),
        "whiten:tiles:5": l2(projected[:, :5] / np.sqrt(eig[:5])),
        "pca:tiles:4": l2(projected[:, :4]),
    }
    for post, want in expected.items():
        got = served[post]
        assert got.shape == want.shape, post
        agreement = np.sum(got * want, axis=0)  # per axis: ±(sum of squares) if they agree
        assert np.all(np.abs(agreement) > 0.1 * np.sum(want**2, axis=0)), (post, agreement)
        np.testing.assert_allclose(got, want * np.sign(agreement), atol=2e-4, err_msg=post)


def test_fit_whitening_command(
    small_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "tiles"
    folder.mkdir()
    _tiles(folder, 12)
    out = tmp_path / "head.npz"
    saved = tmp_path / "desc.npz"
    base = ["--target", small_server.target, "fit-whitening", str(folder), "--model"]
    argv = [*base, "mobilenet_v2", "-n", "features", "--pool", "gem", "--no-progress"]
    assert main([*argv, "--dim", "8", "-o", str(out), "--descriptors", str(saved)]) == 0
    text = capsys.readouterr().out
    assert "8 components of 1280-d descriptors" in text and "fitted on 12 images" in text
    assert "[[heads]]" in text and 'name = "head"' in text and "whiten:head" in text
    head = wh.load(out)
    assert head.n_components == 8 and head.input_dim == 1280
    assert head.model == "mobilenet_v2" and head.nodes == ("features",) and head.pool == "gem"
    # fitted on the L2-normalised GeM descriptors the server returns for those images
    with np.load(saved, allow_pickle=False) as npz:
        tile_ids = [str(i) for i in npz["ids"]]
        x = npz["features"].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert sorted(tile_ids) == sorted(p.name for p in folder.iterdir()) and x.shape == (12, 1280)
    with FeatureClient(small_server.target) as client:
        direct = client.extract(
            [str(folder / i) for i in tile_ids],
            model="mobilenet_v2",
            nodes="features",
            pool="gem",
            normalize=True,
        )["features"]
    np.testing.assert_allclose(direct, x, atol=1e-5)
    # the head against the textbook PCA of docs/DESCRIPTORS.md, computed here: the sample
    # mean, and the eigendecomposition of the covariance Xcᵀ Xc / (n - 1) (np.cov, eigh)
    mean, eig, vecs = _reference(x)
    np.testing.assert_allclose(head.mean, mean, atol=1e-6)
    np.testing.assert_allclose(head.eigvals, eig[:8], rtol=1e-4)
    dots = np.abs(np.sum(head.components.astype(np.float64) * vecs[:, :8].T, axis=1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-4)  # the same axes, up to sign
    check_served_whitening(head_file=out, images=[folder / i for i in tile_ids], x=x)

    # two nodes concatenated: each part L2-normalised, then the whole
    cat, parts = tmp_path / "cat.npz", tmp_path / "parts.npz"
    two = [*base, "mobilenet_v2", "-n", "features.14", "-n", "features", "--concat"]
    argv2 = [*two, "--pool", "avg", "-o", str(cat), "--descriptors", str(parts), "--no-progress"]
    assert main(argv2) == 0
    assert "concat=True" in capsys.readouterr().out
    head2 = wh.load(cat)
    assert head2.input_dim == 160 + 1280 and head2.n_components == 11
    assert head2.nodes == ("features.14", "features")
    # the vector it was fitted on is the one the server's concat=True returns
    with np.load(parts, allow_pickle=False) as npz:
        ids = [str(i) for i in npz["ids"]]
        fitted = wh.concat_parts([npz["features.14"], npz["features"]])
    np.testing.assert_allclose(head2.mean, fitted.mean(0), atol=1e-5)
    with FeatureClient(small_server.target) as client:
        served = client.extract(
            [str(folder / i) for i in ids[:3]],
            model="mobilenet_v2",
            nodes=["features.14", "features"],
            pool="avg",
            concat=True,
        )["descriptor"]
    np.testing.assert_allclose(served, fitted[:3], atol=1e-5)


def test_fit_whitening_refusals(
    small_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    paths = _tiles(folder, 4)
    base = ["--target", small_server.target, "fit-whitening", "--model", "mobilenet_v2"]
    out = str(tmp_path / "h.npz")
    assert main([*base, str(folder), "-n", "features", "--dim", "4", "-o", out]) == 2
    assert "min(n - 1, D) = 3" in capsys.readouterr().err
    assert main([*base, str(paths[0]), "-n", "features", "-o", out]) == 2
    assert "at least 2 images, got 1" in capsys.readouterr().err
    assert main([*base, str(folder), "-n", "features.14", "-n", "features", "-o", out]) == 2
    assert "--concat" in capsys.readouterr().err
    assert main([*base, str(folder), "-n", "features", "-o", str(tmp_path / "h.txt")]) == 2
    assert ".npz" in capsys.readouterr().err
    assert not (tmp_path / "h.npz").exists()  # nothing written by any refusal


def test_fit_whitening_fits_on_the_images_that_worked(
    small_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    _tiles(folder, 5)
    (folder / "broken.jpg").write_bytes(b"not a JPEG")
    out = tmp_path / "h.npz"
    argv = ["--target", small_server.target, "fit-whitening", str(folder), "--model"]
    assert main([*argv, "mobilenet_v2", "-n", "features", "-o", str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.out and "fitted on the others" in captured.out
    assert "fitted on 5 images" in captured.out
    assert wh.load(out).n_components == 4
