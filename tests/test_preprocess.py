"""server/preprocess.py must reproduce ``weights.transforms()`` on uint8 tensors: bit for bit with
the "float" resize kernel, within one uint8 level (and equal to torchvision v2's uint8 pipeline)
with the default "uint8" kernel."""

from __future__ import annotations

import dataclasses
from functools import cache

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
import torch
import torchvision.transforms.functional as F
import torchvision.transforms.v2.functional as F2
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision.models import Inception_V3_Weights, MobileNet_V2_Weights, ResNet50_Weights
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

import layertap.server.preprocess as preprocess_module
from layertap.server.preprocess import Preprocessing, preprocess

WEIGHTS = {
    "resnet50_v2": ResNet50_Weights.IMAGENET1K_V2,
    "mobilenet_v2": MobileNet_V2_Weights.IMAGENET1K_V1,
    "inception_v3": Inception_V3_Weights.IMAGENET1K_V1,
}
PHOTOS = ["astronaut", "chelsea", "coffee", "china", "grace_hopper"]
ONE_LEVEL = 1 / 255 / 0.224 + 1e-4  # one uint8 step after normalisation (smallest std)


@cache
def photo(name: str) -> torch.Tensor:
    """uint8 [3, H, W] photo."""
    if name == "china":
        arr = load_sample_image("china.jpg")
    elif name == "grace_hopper":
        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    else:
        arr = getattr(skimage.data, name)()
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous()


def exact(transforms: object) -> Preprocessing:
    """The spec with the float resize kernel: bit-exact with `transforms` on tensors."""
    return dataclasses.replace(Preprocessing.from_torchvision(transforms), resize_kernel="float")


def v2_reference(img: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """torchvision v2's own functional pipeline on the uint8 tensor (its native uint8 resize)."""
    out = F2.resize(
        img,
        [spec.resize_size],
        interpolation=InterpolationMode(spec.interpolation),
        antialias=spec.antialias,
    )
    out = F2.to_dtype(F2.center_crop(out, list(spec.crop_size)), torch.float32, scale=True)
    return F2.normalize(out, mean=list(spec.mean), std=list(spec.std))


def random_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("name", PHOTOS)
def test_matches_torchvision_preset_on_photos(weights: str, name: str) -> None:
    transforms = WEIGHTS[weights].transforms()
    spec = exact(transforms)
    img = photo(name)
    out = preprocess(img, spec)
    ref = transforms(img)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert out.shape[1:] == spec.crop_size
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("name", PHOTOS)
def test_uint8_kernel_is_v2_and_within_one_level_of_the_preset(weights: str, name: str) -> None:
    transforms = WEIGHTS[weights].transforms()
    spec = Preprocessing.from_torchvision(transforms)
    assert spec.resize_kernel == "uint8"  # the default
    img = photo(name)
    for layout in (img, img.permute(1, 2, 0).contiguous().permute(2, 0, 1)):  # CHW, HWC memory
        out = preprocess(layout, spec)
        assert out.shape == (3, *spec.crop_size)
        assert (out - v2_reference(img, spec)).abs().max().item() <= 1e-5
        diff = (out - transforms(img)).abs()
        assert diff.max().item() <= ONE_LEVEL
        assert 0 < diff.mean().item() < 0.25 * ONE_LEVEL  # mostly equal, not a copy of it


def test_uint8_kernel_is_the_cheap_one() -> None:
    """Counted, not timed: the uint8 kernel never converts the full-size image to float."""
    spec = Preprocessing.from_torchvision(MobileNet_V2_Weights.IMAGENET1K_V1.transforms())
    img = photo("astronaut")
    seen: list[tuple[torch.dtype, int]] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                seen.append((out.dtype, out.numel()))
            return out

    with Spy():
        preprocess(img, spec)
    big_float = [n for dtype, n in seen if dtype.is_floating_point and n > 3 * 224 * 224]
    assert big_float == []
    seen.clear()
    with Spy():
        preprocess(img, dataclasses.replace(spec, resize_kernel="float"))
    assert any(dtype.is_floating_point and n >= 3 * 256 * 256 for dtype, n in seen)


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize(
    "hw", [(1, 1), (7, 5), (100, 50), (224, 224), (299, 300), (333, 1000), (1000, 333)]
)
def test_matches_torchvision_preset_on_odd_sizes(weights: str, hw: tuple[int, int]) -> None:
    transforms = WEIGHTS[weights].transforms()
    img = random_image(*hw)
    out = preprocess(img, exact(transforms))
    assert (out - transforms(img)).abs().max().item() <= 1e-5
    fast = preprocess(img, Preprocessing.from_torchvision(transforms))
    assert (fast - transforms(img)).abs().max().item() <= ONE_LEVEL


def test_from_torchvision_reads_the_presets() -> None:
    r = Preprocessing.from_torchvision(ResNet50_Weights.IMAGENET1K_V2.transforms())
    assert r == Preprocessing(
        resize_size=232,
        crop_size=(224, 224),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        interpolation="bilinear",
        antialias=True,
    )
    m = Preprocessing.from_torchvision(MobileNet_V2_Weights.IMAGENET1K_V1.transforms())
    assert (m.resize_size, m.crop_size) == (256, (224, 224))
    i = Preprocessing.from_torchvision(Inception_V3_Weights.IMAGENET1K_V1.transforms())
    assert (i.resize_size, i.crop_size) == (342, (299, 299))
    bicubic = ImageClassification(
        crop_size=384, resize_size=384, interpolation=InterpolationMode.BICUBIC, antialias=None
    )
    b = Preprocessing.from_torchvision(bicubic)
    assert (b.interpolation, b.antialias, b.crop_size) == ("bicubic", False, (384, 384))
    hash(b)  # frozen: usable as a cache key


def test_from_torchvision_rejects_other_presets() -> None:
    with pytest.raises(ValueError, match="not an image-classification preset"):
        Preprocessing.from_torchvision(object())


@pytest.mark.parametrize("interp", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("antialias", [True, False])
def test_matches_other_interpolations(interp: str, antialias: bool) -> None:
    t = ImageClassification(
        crop_size=224,
        resize_size=256,
        interpolation=InterpolationMode(interp),
        antialias=antialias,
    )
    for img in (photo("chelsea"), random_image(50, 90)):
        assert (preprocess(img, exact(t)) - t(img)).abs().max().item() <= 1e-5
        fast = preprocess(img, Preprocessing.from_torchvision(t))
        assert (fast - v2_reference(img, Preprocessing.from_torchvision(t))).abs().max() <= 1e-5


def test_describe() -> None:
    spec = Preprocessing.from_torchvision(MobileNet_V2_Weights.IMAGENET1K_V1.transforms())
    assert spec.describe() == (
        "resize 256 bilinear (uint8 antialias), center-crop 224x224, "
        "normalize mean=(0.485, 0.456, 0.406) std=(0.229, 0.224, 0.225)"
    )
    no_resize = Preprocessing(None, (112, 96), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "nearest")
    assert no_resize.describe().startswith("no resize, center-crop 112x96, ")


def test_no_resize_only_crops_and_normalises() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for resize in (None, 0):
        spec = Preprocessing(resize, (100, 120), mean, std)
        assert spec.resize_size is None
        img = photo("coffee")
        ref = F.normalize(
            F.convert_image_dtype(F.center_crop(img, [100, 120]), torch.float),
            list(mean),
            list(std),
        )
        # the fused uint8-path normalisation equals v1's to float32 rounding; "float" bit-exact
        torch.testing.assert_close(preprocess(img, spec), ref, atol=1e-6, rtol=0)
        assert torch.equal(preprocess(img, dataclasses.replace(spec, resize_kernel="float")), ref)


def test_small_images_are_padded_like_torchvision() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = Preprocessing(None, (224, 224), mean, std)
    img = random_image(10, 31)
    out = preprocess(img, spec)
    ref = F.normalize(
        F.convert_image_dtype(F.center_crop(img, [224, 224]), torch.float), list(mean), list(std)
    )
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert out.is_contiguous()
    pad_value = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)])
    assert torch.allclose(out[:, 0, 0], pad_value)
    # resize_size smaller than the crop pads too.
    t = ImageClassification(crop_size=224, resize_size=200)
    img = photo("astronaut")
    assert (preprocess(img, exact(t)) - t(img)).abs().max() <= 1e-5


@pytest.mark.parametrize("hw", [(1, 300), (300, 1), (2, 400), (1, 1), (1, 3), (3, 1)])
def test_thin_images_do_not_crash_and_stay_close(hw: tuple[int, int]) -> None:
    transforms = ResNet50_Weights.IMAGENET1K_V2.transforms()
    img = random_image(*hw)
    out = preprocess(img, Preprocessing.from_torchvision(transforms))
    assert out.shape == (3, 224, 224) and torch.isfinite(out).all()
    assert (out - transforms(img)).abs().max().item() <= ONE_LEVEL


@pytest.mark.parametrize("hw", [(1, 4000), (4000, 1)])
def test_thin_4000_pixel_images(hw: tuple[int, int]) -> None:
    spec = Preprocessing.from_torchvision(ResNet50_Weights.IMAGENET1K_V2.transforms())
    img = random_image(*hw)
    out = preprocess(img, spec)
    assert out.shape == (3, 224, 224) and torch.isfinite(out).all()
    # The crop shows the (upscaled) middle of the strip: pixels 1999..2000 of the long axis.
    middle = img[:, 0, 1999:2001] if hw[0] == 1 else img[:, 1999:2001, 0]
    lo = (middle.amin(1).float() / 255 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    hi = (middle.amax(1).float() / 255 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert (out.amin((1, 2)) >= lo - ONE_LEVEL).all() and (out.amax((1, 2)) <= hi + ONE_LEVEL).all()


def test_extreme_aspect_ratio_is_cheap() -> None:
    spec = Preprocessing.from_torchvision(ResNet50_Weights.IMAGENET1K_V2.transforms())
    # 1x40M would be resized to 232 x 9.3e9 pixels by the plain path.
    out = preprocess(torch.zeros((3, 1, 40_000_000), dtype=torch.uint8), spec)
    assert out.shape == (3, 224, 224)
    out = preprocess(torch.full((3, 8_000_000, 2), 255, dtype=torch.uint8), spec)
    assert out.shape == (3, 224, 224)
    expected = torch.tensor([(1 - m) / s for m, s in zip(spec.mean, spec.std, strict=True)])
    assert torch.allclose(out.amax((1, 2)), expected) and torch.allclose(out.amin((1, 2)), expected)


@pytest.mark.parametrize("interp", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("hw", [(20, 3000), (3000, 20), (7, 2999), (300, 30000)])
def test_strip_path_matches_full_resize_within_rounding(
    interp: str, antialias: bool, hw: tuple[int, int]
) -> None:
    """The bounded-memory path for huge resized outputs agrees with torchvision's full resize."""
    t = ImageClassification(
        crop_size=224, resize_size=232, interpolation=InterpolationMode(interp), antialias=antialias
    )
    spec = Preprocessing.from_torchvision(t)
    new_short = 232
    new_long = int(232 * max(hw) / min(hw))
    assert new_short * new_long > preprocess_module._MAX_RESIZED_PIXELS  # strip path taken
    img = random_image(*hw, seed=hw[0])
    diff = (preprocess(img, spec) - t(img)).abs()
    assert diff.max().item() <= ONE_LEVEL
    assert diff.mean().item() < 1e-3


def test_strip_path_when_downscaling_a_real_panorama() -> None:
    t = ResNet50_Weights.IMAGENET1K_V2.transforms()
    spec = Preprocessing.from_torchvision(t)
    strip = photo("china")[:, :300, :].repeat(1, 1, 48)  # 300 x 30720: 232 x 23756 after resize
    assert 232 * int(232 * 30720 / 300) > preprocess_module._MAX_RESIZED_PIXELS
    for img in (strip, strip.transpose(1, 2)):
        diff = (preprocess(img, spec) - t(img)).abs()
        assert diff.max().item() <= ONE_LEVEL and diff.mean().item() < 1e-3


def test_rejects_bad_input_and_specs() -> None:
    spec = Preprocessing.from_torchvision(ResNet50_Weights.IMAGENET1K_V2.transforms())
    with pytest.raises(ValueError, match="uint8"):
        preprocess(torch.zeros((3, 10, 10)), spec)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        preprocess(torch.zeros((10, 10, 3), dtype=torch.uint8), spec)
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(256, (224, 224), (0, 0, 0), (1, 1, 1), "lanczos")
    with pytest.raises(ValueError, match="crop_size"):
        Preprocessing(256, (0, 224), (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="std"):
        Preprocessing(256, (224, 224), (0, 0, 0), (1, 0, 1))
    with pytest.raises(ValueError, match="resize_kernel"):
        Preprocessing(256, (224, 224), (0, 0, 0), (1, 1, 1), resize_kernel="pil")


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_squash_resizes_to_the_crop_shape_like_pil(name: str, interp: str) -> None:
    """resize_mode "squash" (Hugging Face {height, width} sizes, timm's squash crop mode): the
    float kernel equals torchvision's resize to (H, W) on the tensor, the uint8 kernel is within
    one level of Pillow's resize of the same photo (how HF and timm resize PIL images) but for
    one value."""
    img = photo(name)
    spec = Preprocessing(
        240, (224, 224), (0.5,) * 3, (0.25,) * 3, interp, True, "float", resize_mode="squash"
    )
    resized = F.resize(img, [240, 240], interpolation=InterpolationMode(interp), antialias=True)
    ref = F.normalize(
        F.convert_image_dtype(F.center_crop(resized, [224, 224]), torch.float),
        [0.5] * 3,
        [0.25] * 3,
    )
    assert torch.equal(preprocess(img, spec), ref)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interp]
    pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((240, 240), resample)
    pil_t = torch.from_numpy(np.asarray(pil)).permute(2, 0, 1)
    pil_ref = F.normalize(
        F.convert_image_dtype(F.center_crop(pil_t, [224, 224]), torch.float), [0.5] * 3, [0.25] * 3
    )
    fast = preprocess(img, dataclasses.replace(spec, resize_kernel="uint8"))
    levels = ((fast - pil_ref).abs() * 255 * 0.25).round()
    # v2's uint8 kernel is a port of Pillow's; their rounding differs by one level, and on
    # chelsea (300 x 451, one axis upscaled) by two at 1 value of 150,528
    assert levels.max() <= 2
    assert (levels > 1).sum() <= 1


def test_squash_geometry_and_describe() -> None:
    """A squash keeps no aspect: each axis has its own scale, and a non-square crop scales the
    size to its shape; describe() says so."""
    spec = Preprocessing(200, (100, 200), (0.0,) * 3, (1.0,) * 3, resize_mode="squash")
    assert spec.squash_size() == (200, 400)
    geo = preprocess_module.geometry(50, 1000, spec)
    assert geo.input_hw == (100, 200)
    assert geo.scale == (200 / 50, 400 / 1000)
    assert geo.offset == (50.0, 100.0)
    out = preprocess(torch.zeros(3, 50, 1000, dtype=torch.uint8), spec)
    assert out.shape == (3, 100, 200)
    assert "resize 200x400 (squash)" in spec.describe()
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        Preprocessing(256, (224, 224), (0, 0, 0), (1, 1, 1), resize_mode="longer")


@pytest.mark.parametrize("size", [(335, 224), (224, 333), (230, 231), (200, 100)])
def test_floor_crop_offset_is_hugging_faces(size: tuple[int, int]) -> None:
    """crop_offset "floor" puts the crop at (size - crop) // 2, as Hugging Face image processors
    do (torchvision rounds: 55.5 -> 56 where HF takes 55), pads like torchvision when the image
    is smaller, and the geometry agrees with where the pixels went."""
    h, w = size
    img = torch.arange(3 * h * w, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, h, w)
    spec = Preprocessing(None, (224, 224), (0.0,) * 3, (1.0,) * 3, crop_offset="floor")
    out = (preprocess(img, spec) * 255).round().to(torch.uint8)
    geo = preprocess_module.geometry(h, w, spec)
    top, left = int(geo.offset[0]), int(geo.offset[1])
    pads = [max(0, -left), max(0, -top), max(0, 224 - w + left), max(0, 224 - h + top)]
    padded = F.pad(img, pads)
    want = padded[:, max(0, top) : max(0, top) + 224, max(0, left) : max(0, left) + 224]
    assert torch.equal(out, want)
    assert (top, left) == tuple((s - 224) // 2 if s >= 224 else -((224 - s) // 2) for s in (h, w))
    rounded = preprocess_module.geometry(h, w, dataclasses.replace(spec, crop_offset="round"))
    assert rounded.offset == tuple(
        float(round((s - 224) / 2)) if s >= 224 else geo.offset[i] for i, s in enumerate((h, w))
    )
    assert "(offset floor)" in spec.describe()
    with pytest.raises(ValueError, match="crop_offset must be one of"):
        dataclasses.replace(spec, crop_offset="ceil")
