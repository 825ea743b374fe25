"""Pictures: feature-map grids with a heatmap over the photo, and conv-kernel grids.

The maths is checked on numpy arrays; the commands run a real photo through a real
in-process server (mobilenet_v2 with its ImageNet weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, photo
from PIL import Image

from layertap.client import (
    ExtractMetadata,
    ExtractResult,
    FeatureClient,
    FeatureServiceError,
    Preprocessing,
    Timings,
    viz,
)
from layertap.client.cli import main, pictures

# --------------------------------------------------------------------------- numpy only


def test_to_chw_handles_every_spatial_layout() -> None:
    rng = np.random.default_rng(0)
    nchw = rng.standard_normal((5, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(viz.to_chw(nchw, "NCHW"), nchw)
    np.testing.assert_array_equal(viz.to_chw(nchw[None], "NCHW"), nchw)  # batch of one
    np.testing.assert_array_equal(viz.to_chw(nchw.transpose(1, 2, 0), "NHWC"), nchw)
    # ViT tokens: one CLS token, then a 14 x 14 grid row by row
    tokens = rng.standard_normal((197, 8)).astype(np.float32)
    grid = viz.to_chw(tokens, "NLC")
    assert grid.shape == (8, 14, 14)
    np.testing.assert_array_equal(grid[:, 2, 3], tokens[1 + 2 * 14 + 3])
    assert viz.to_chw(rng.standard_normal((1, 200, 3)), "NLC").shape == (3, 14, 14)  # 4 regs
    with pytest.raises(viz.VizError, match="no spatial feature map"):
        viz.to_chw(np.zeros((1, 1000)), "NC")
    with pytest.raises(viz.VizError, match="no spatial feature map"):
        viz.to_chw(np.zeros((1, 64)), "NCHW")  # pooled
    with pytest.raises(viz.VizError, match="square patch grid"):
        viz.to_chw(np.zeros((15 * 15 + 20, 4)), "NLC")


def test_pick_channels_first_or_most_active() -> None:
    maps = np.zeros((6, 2, 2), np.float32)
    maps[4] += 3
    maps[1] += 2
    maps[5] += 2
    assert viz.pick_channels(maps, 3, top=False) == [0, 1, 2]
    assert viz.pick_channels(maps, 3, top=True) == [4, 1, 5]  # ties in channel order
    assert viz.pick_channels(maps, 10, top=False) == list(range(6))


def test_resize_bilinear_matches_pillow_when_upsampling() -> None:
    small = np.random.default_rng(1).random((5, 7)).astype(np.float32)
    ours = viz.resize_bilinear(small, 23, 31)
    pil = np.asarray(Image.fromarray(small, mode="F").resize((31, 23), Image.Resampling.BILINEAR))
    assert ours.shape == (23, 31)
    np.testing.assert_allclose(ours, pil, atol=1e-4)


def test_filter_tiles_rgb_and_mean() -> None:
    rng = np.random.default_rng(2)
    first = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    tiles, rgb = viz.filter_tiles(first)
    assert rgb and tiles.shape == (4, 5, 5, 3)
    for tile, kernel in zip(tiles, first, strict=True):  # min-max per kernel
        assert tile.min() == 0 and tile.max() == pytest.approx(1)
        expected = (kernel - kernel.min()) / (kernel.max() - kernel.min())
        np.testing.assert_allclose(tile, expected.transpose(1, 2, 0), atol=1e-6)
    deep = rng.standard_normal((6, 16, 3, 3)).astype(np.float32)
    tiles, rgb = viz.filter_tiles(deep)
    assert not rgb and tiles.shape == (6, 3, 3)
    order = np.argsort(deep[2].mean(axis=0), axis=None)
    assert tiles[2].flat[order[0]] == 0 and tiles[2].flat[order[-1]] == pytest.approx(1)
    with pytest.raises(viz.VizError, match="not a 2-D conv kernel"):
        viz.filter_tiles(np.zeros((10, 20)), "fc.weight")


def test_crop_box_is_the_servers_resize_and_centre_crop() -> None:
    # 512 x 768, shorter side to 256 (x0.5), centre 224 crop = 448 x 448 of the original
    assert viz.crop_box((512, 768), 256, (224, 224)) == (32, 160, 448, 448)
    assert viz.crop_box((100, 100), 0, (64, 64)) == (18, 18, 64, 64)  # no resize


def test_pictures_have_the_size_they_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    maps = rng.random((20, 9, 12)).astype(np.float32)
    pic = viz.feature_maps_picture(maps, photo("coffee"), tmp_path / "m.png", count=7)
    with Image.open(tmp_path / "m.png") as png:
        assert png.size == pic.size_px
    assert pic.channels == list(range(7)) and len(pic.tiles) == 7
    assert pic.heatmap.shape == photo("coffee").shape[:2]
    pic2 = viz.filters_picture(rng.standard_normal((10, 3, 3, 3)), tmp_path / "f.png")
    with Image.open(tmp_path / "f.png") as png:
        assert png.size == pic2.size_px and png.size[0] > 0


def test_missing_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now fails
    argv = ["--target", "127.0.0.1:1", "show-filters", "m", "-n", "c", "-o", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "pip install 'layertap[viz]'" in capsys.readouterr().err
    img = tmp_path / "a.jpg"
    img.write_bytes(encode(photo("chelsea")))
    argv = ["--target", "127.0.0.1:1", "show-maps", str(img), "--model", "m", "-n", "x",
            "-o", str(tmp_path / "y.png")]  # fmt: skip
    assert main(argv) == 2
    assert "pip install 'layertap[viz]'" in capsys.readouterr().err


# --------------------------------------------------------------------------- real server


@pytest.fixture
def cat_jpg(tmp_path: Path) -> Path:
    path = tmp_path / "chelsea.jpg"
    path.write_bytes(encode(photo("chelsea")))
    return path


def test_show_maps_of_a_real_photo(
    small_server: RunningServer, cat_jpg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "maps.png"
    argv = ["--target", small_server.target, "show-maps", str(cat_jpg), "--model",
            "mobilenet_v2", "--node", "features.3", "--channels", "9", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    with Image.open(out) as png:
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"))
    assert f"wrote {out} ({width}x{height})" in printed and "[0, 1, 2, 3, 4, 5, 6, 7, 8]" in printed
    assert width > height > 300 and pixels.std() > 10  # a drawn picture, not a blank canvas

    # The same maps, drawn directly: the whole photo is covered at its own resolution.
    cat = photo("chelsea")
    with FeatureClient(small_server.target) as client:
        result = client.extract(
            cat, model="mobilenet_v2", nodes="features.3", native_resolution=True
        )
    maps = viz.to_chw(result["features.3"][0], result.layouts["features.3"])
    h, w = cat.shape[:2]
    assert maps.shape == (24, -(-h // 4), -(-w // 4))  # stride 4 over all of 300 x 451
    pic = viz.feature_maps_picture(maps, cat, tmp_path / "direct.png", count=9, top=True)
    assert pic.heatmap.shape == (h, w) and pic.overlay.shape == (h, w, 3)
    means = maps.reshape(24, -1).mean(axis=1)
    assert pic.channels == [int(c) for c in np.argsort(-means, kind="stable")[:9]]
    assert means[pic.channels[0]] == means.max()
    for i in range(len(pic.tiles)):  # distinct channels look different
        for j in range(i + 1, len(pic.tiles)):
            assert not np.allclose(pic.tiles[i], pic.tiles[j], atol=1e-3)


def test_show_maps_refuses_vectors(
    small_server: RunningServer, cat_jpg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--target", small_server.target, "show-maps", str(cat_jpg), "--model",
            "mobilenet_v2", "-n", "classifier.1", "-o", str(tmp_path / "m.png")]  # fmt: skip
    assert main(argv) == 2
    assert "no spatial feature map" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_show_filters_of_the_first_conv(
    small_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "filters.png"
    target = ["--target", small_server.target]
    assert main([*target, "show-filters", "mobilenet_v2", "--node", "features.0.0", "-o",
                 str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "32 kernels, RGB" in printed
    with Image.open(out) as png:
        assert f"({png.size[0]}x{png.size[1]})" in printed
        pixels = np.asarray(png.convert("RGB")).astype(np.int16)
    assert pixels.std() > 10  # a drawn picture, not a blank canvas
    # the picture's tiles are the model's own kernels, normalised
    with FeatureClient(small_server.target) as client:
        weight = client.get_parameters("mobilenet_v2", ["features.0.0.weight"])[
            "features.0.0.weight"
        ]
    assert weight.shape == (32, 3, 3, 3)
    pic = viz.filters_picture(weight, tmp_path / "again.png")
    assert pic.rgb and pic.tiles.shape == (32, 3, 3, 3)
    k = weight[5].transpose(1, 2, 0)
    np.testing.assert_allclose(pic.tiles[5], (k - k.min()) / (k.max() - k.min()), atol=1e-6)

    # a deeper conv: mean over its input channels in a colormap
    assert main([*target, "show-filters", "mobilenet_v2", "-n", "features.1.conv.1",
                 "--count", "10", "-o", str(tmp_path / "deep.png")]) == 0  # fmt: skip
    assert "10 kernels, mean over input channels" in capsys.readouterr().out


def test_show_filters_refuses_what_is_not_a_conv(
    small_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", small_server.target, "show-filters", "mobilenet_v2"]
    out = ["-o", str(tmp_path / "f.png")]
    assert main([*target, "-n", "features.0", *out]) == 2  # a container
    assert "conv layers under it: features.0.0" in capsys.readouterr().err
    assert main([*target, "-n", "classifier.1", *out]) == 2  # Linear [1000, 1280]
    assert "not a 2-D conv kernel" in capsys.readouterr().err
    assert main([*target, "-n", "features.0.1", *out]) == 2  # BatchNorm [32]
    assert "not a 2-D conv kernel" in capsys.readouterr().err
    assert main([*target, "-n", "nothing.here", *out]) == 1  # the server's own message
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()


def test_show_maps_of_a_fixed_size_model_overlays_the_centre_crop(
    tmp_path: Path, cat_jpg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ViT refuses native resolution: its tokens cover the server's resize + centre crop,
    so the heatmap is laid over that part of the photo."""
    prep = Preprocessing(256, (224, 224), (0.5,) * 3, (0.5,) * 3, "bilinear", True)
    meta = ExtractMetadata("vit", "x", "cpu", 1, [], prep, Timings(0, 0, 0, 0))
    tokens = np.random.default_rng(4).random((1, 197, 12)).astype(np.float32)

    class FixedSize:
        def extract(self, image: np.ndarray, **kwargs: object) -> ExtractResult:
            assert image.shape == photo("chelsea").shape
            if kwargs.get("native_resolution"):
                raise FeatureServiceError(grpc.StatusCode.INVALID_ARGUMENT, "fixed input size")
            return ExtractResult({"map": tokens}, [{"map": tokens[0]}], {"map": "NLC"},
                                 {"map": "encoder.layers.encoder_layer_11"}, meta)  # fmt: skip

    drawn: list[tuple[np.ndarray, np.ndarray]] = []
    real = viz.feature_maps_picture

    def spy(maps: np.ndarray, shown: np.ndarray, *args: object, **kwargs: object) -> object:
        drawn.append((maps, shown))
        return real(maps, shown, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(viz, "feature_maps_picture", spy)
    args = argparse.Namespace(image=cat_jpg, model="vit", node="encoder", channels=4, top=False,
                              max_size=1024, output=tmp_path / "vit.png")  # fmt: skip
    assert pictures.show_maps(FixedSize(), args) == 0  # type: ignore[arg-type]
    ((maps, shown),) = drawn
    assert maps.shape == (12, 14, 14)
    # chelsea is 300 x 451: x256/300, a 224 crop is 262 x 262 of the original, centred
    top, left = (300 - 262) // 2, (451 - 262) // 2
    with Image.open(cat_jpg) as decoded:
        pixels = np.asarray(decoded.convert("RGB"))
    np.testing.assert_array_equal(shown, pixels[top : top + 262, left : left + 262])
    assert (tmp_path / "vit.png").exists()
