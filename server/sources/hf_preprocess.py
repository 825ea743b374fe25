"""A Hugging Face image processor (preprocessor_config.json) translated into Preprocessing,
exactly or not at all: what cannot be reproduced fails the load, naming the entry keys that
describe the transform instead. Also the directory checks both halves of the source share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers

from ..model_config import ModelConfig
from ..models import ModelLoadError, apply_overrides
from ..preprocess import Preprocessing

PROCESSOR = "preprocessor_config.json"
# PIL resampling codes the image processors store -> Preprocessing.interpolation. Not 0: the
# torchvision backend turns PIL's NEAREST into nearest-exact, which Preprocessing lacks.
RESAMPLE = {2: "bilinear", 3: "bicubic"}
# the keys an entry sets to describe the transform itself when the processor's cannot be read
OVERRIDE_KEYS = "input_size, resize_size, resize_mode, interpolation, mean, std"


def fail(cfg: ModelConfig, message: str) -> ModelLoadError:
    """A load error naming the entry."""
    return ModelLoadError(f"model {cfg.name!r}: {message}")


def read_json(cfg: ModelConfig, file: Path) -> dict[str, Any]:
    """A JSON object from the directory, or a load error saying what is wrong with the file."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise fail(cfg, f"cannot read {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise fail(cfg, f"{file} does not hold a JSON object")
    return data


def no_remote_code(cfg: ModelConfig, file: Path, data: dict[str, Any]) -> None:
    """A description whose classes live in the directory's own Python files (auto_map) would
    run that code: refused, whatever the model_type says."""
    if data.get("auto_map"):
        raise fail(
            cfg,
            f"{file} needs remote code (auto_map: {sorted(data['auto_map'])}); "
            "trust_remote_code is not supported: serve such a model through a factory that "
            "builds it from code you have reviewed",
        )


# ------------------------------------------------------------------------------
def _processor(cfg: ModelConfig, folder: Path) -> Any:
    file = folder / PROCESSOR
    if not file.is_file():
        raise fail(
            cfg,
            f"{folder} has no {PROCESSOR}: the input transform comes from the image processor; "
            "write it with AutoImageProcessor.from_pretrained(<the model's processor>)"
            ".save_pretrained(path), or with e.g. ViTImageProcessor(size=..., image_mean=..., "
            "image_std=...).save_pretrained(path)",
        )
    no_remote_code(cfg, file, read_json(cfg, file))
    try:
        return transformers.AutoImageProcessor.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # an unknown image_processor_type, a malformed file
        raise fail(cfg, f"cannot read the image processor in {file}: {exc}") from exc


def _standard(proc: Any) -> bool:
    """A processor whose transform is the torchvision backend's own (resize, centre crop,
    rescale and normalise, nothing else)."""
    from transformers.image_processing_backends import TorchvisionBackend

    steps = ("resize", "_preprocess", "center_crop", "rescale_and_normalize", "process_image")
    return isinstance(proc, TorchvisionBackend) and all(
        getattr(type(proc), s) is getattr(TorchvisionBackend, s) for s in steps
    )


def _size(value: Any) -> dict[str, int]:
    items = value.items() if isinstance(value, dict) else vars(value).items()
    return {k: int(v) for k, v in items if v is not None}


def _three(value: Any, default: float) -> tuple[float, float, float]:
    if value is None:
        return (default,) * 3
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    a, b, c = (float(v) for v in value)
    return (a, b, c)


def _geometry(cfg: ModelConfig, proc: Any, name: str) -> tuple[int | None, tuple[int, int], str]:
    """(resize_size, crop (H, W), resize_mode) of the processor's resize and centre crop."""

    def refuse(what: str) -> ModelLoadError:
        return fail(
            cfg,
            f"{PROCESSOR} ({name}) {what}, which layertap's preprocessing cannot express; "
            "describe the transform in the entry instead (input_size, resize_size, resize_mode)",
        )

    resize = bool(getattr(proc, "do_resize", False))
    size = _size(getattr(proc, "size", None) or {}) if resize else {}
    crop_on = bool(getattr(proc, "do_center_crop", False))
    crop = _size(getattr(proc, "crop_size", None) or {}) if crop_on else {}
    if crop_on and set(crop) != {"height", "width"}:
        raise refuse(f"has crop_size {crop}")
    if name == "ConvNextImageProcessor":  # resize and crop both live in its resize()
        edge = size.get("shortest_edge")
        if not resize or edge is None or crop_on:
            raise refuse(f"has do_resize {resize}, size {size}, do_center_crop {crop_on}")
        if edge >= 384:  # warped to edge x edge, no crop
            return edge, (edge, edge), "squash"
        return int(edge / float(proc.crop_pct)), (edge, edge), "shorter"
    if not resize:
        if not crop_on:
            raise refuse("neither resizes nor crops (every image keeps its own size)")
        return None, (crop["height"], crop["width"]), "shorter"
    if set(size) == {"shortest_edge"}:
        if not crop_on:
            raise refuse(f"resizes to {size} without a crop (the input size varies)")
        return size["shortest_edge"], (crop["height"], crop["width"]), "shorter"
    if set(size) == {"height", "width"}:
        h, w = size["height"], size["width"]
        if not crop_on:
            return min(h, w), (h, w), "squash"
        ch, cw = crop["height"], crop["width"]
        short = min(ch, cw)
        if (round(min(h, w) * ch / short), round(min(h, w) * cw / short)) != (h, w):
            raise refuse(f"squashes to {h}x{w} then crops {ch}x{cw} (another aspect)")
        return min(h, w), (ch, cw), "squash"
    raise refuse(f"has size {size}")


def _interpolation(cfg: ModelConfig, proc: Any) -> str:
    """The entry's interpolation, else the processor's resample (torchvision backend default:
    bilinear); nearest (run as nearest-exact), lanczos, box and hamming are refused."""
    if cfg.interpolation:
        return cfg.interpolation
    resample = getattr(proc, "resample", None)
    if resample is None:
        return "bilinear"
    name = getattr(resample, "value", resample)  # torchvision's InterpolationMode: its name
    if isinstance(name, str) and name in RESAMPLE.values():
        return name
    try:
        return RESAMPLE[int(name)]
    except (KeyError, TypeError, ValueError):
        raise fail(
            cfg,
            f"{PROCESSOR} resamples with {resample!r} (PIL codes: 0 nearest, which the "
            "processor runs as torchvision's nearest-exact; 1 lanczos; 4 box; 5 hamming), which "
            "layertap's preprocessing lacks; set interpolation = 'bicubic', 'bilinear' or "
            "'nearest' in the entry to serve with that instead",
        ) from None


def _mean_std(cfg: ModelConfig, proc: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """HF computes (x * rescale_factor - image_mean) / image_std on 0..255 pixels;
    Preprocessing normalises x / 255: the same map with mean and std divided by
    255 x rescale_factor (exact for any factor; no normalise: mean 0, std 1)."""
    if cfg.mean and cfg.std:
        return tuple(cfg.mean), tuple(cfg.std)
    scale = 255.0 * float(proc.rescale_factor) if getattr(proc, "do_rescale", False) else 255.0
    if scale <= 0:
        raise fail(cfg, f"{PROCESSOR} has rescale_factor {proc.rescale_factor}; set mean, std")
    normalize = bool(getattr(proc, "do_normalize", False))
    try:
        mean = _three(proc.image_mean if normalize else None, 0.0)
        std = _three(proc.image_std if normalize else None, 1.0)
    except ValueError:  # not three channels
        raise fail(
            cfg,
            f"{PROCESSOR} has image_mean {proc.image_mean}, image_std {proc.image_std}; "
            "set mean and std (three values each) in the entry",
        ) from None
    return tuple(m / scale for m in mean), tuple(s / scale for s in std)


def hf_preprocessing(cfg: ModelConfig, folder: Path) -> tuple[Preprocessing, float]:
    """The image processor's transform as Preprocessing, and its resize-to-crop ratio (for an
    entry's input_size). Exact where it can be; refused, naming the entry's keys, where not.
    An entry that sets input_size, resize_size, mean and std describes the whole transform
    itself (any processor then loads)."""
    proc = _processor(cfg, folder)
    name = type(proc).__name__
    own_geometry = cfg.input_size is not None and cfg.resize_size is not None
    described = own_geometry and bool(cfg.mean and cfg.std)
    if not described and not (_standard(proc) or name == "ConvNextImageProcessor"):
        raise fail(
            cfg,
            f"{PROCESSOR}'s {name} transforms images in its own way, which layertap's "
            f"preprocessing does not reproduce; describe it in the entry ({OVERRIDE_KEYS})",
        )
    if not described and getattr(proc, "do_pad", False) and getattr(proc, "pad_size", None):
        raise fail(
            cfg,
            f"{PROCESSOR} pads to {proc.pad_size}; describe the transform in the "
            f"entry ({OVERRIDE_KEYS})",
        )
    if own_geometry:
        assert cfg.input_size is not None
        resize, crop, mode = cfg.resize_size, tuple(cfg.input_size), cfg.resize_mode or "shorter"
    else:
        resize, crop, mode = _geometry(cfg, proc, name)
    mean, std = _mean_std(cfg, proc)
    base = Preprocessing(
        resize_size=resize,
        crop_size=(int(crop[0]), int(crop[1])),
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
        interpolation=_interpolation(cfg, proc),
        antialias=True,
        resize_mode=mode,
        crop_offset="floor",
    )
    ratio = (resize / min(base.crop_size)) if resize else 1.0
    return base, ratio


def entry_preprocessing(cfg: ModelConfig, folder: Path) -> Preprocessing:
    """Per entry (entries sharing the model differ in their keys): the processor's transform,
    then the entry's overrides."""
    base, ratio = hf_preprocessing(cfg, folder)
    return apply_overrides(cfg, base, ratio)
