"""Hugging Face Transformers models: a save_pretrained() directory (config.json, the weights as
*.safetensors or weights-only *.bin, preprocessor_config.json), read offline with remote code
refused. Preprocessing is the directory's image processor, translated into Preprocessing or
refused when it cannot be.

Which module is served: the class named in config.json's `architectures` when its forward takes
`pixel_values` first (ViTModel, ViTForImageClassification, Dinov2Model, CLIPVisionModel ...);
for a vision-language model (CLIPModel, SiglipModel: a `vision_config` and a forward taking text
first) its vision tower, as the library's own tower class (CLIPVisionModelWithProjection when it
exists, so `visual_projection` is a node; else SiglipVisionModel ...) with the directory's
`vision_model.*` weights; else AutoModel. Node names are that class's module paths.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from ..model_config import ModelConfig
from ..models import (
    RANDOM,
    LoadedWeights,
    ModelLoadError,
    _torch_reason,
    apply_overrides,
    built,
    sha256_files,
)
from ..preprocess import Preprocessing

log = logging.getLogger("layertap.server.models")

CONFIG = "config.json"
PROCESSOR = "preprocessor_config.json"
# (index file, single file) of each weights format, in the order from_pretrained prefers them
WEIGHTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# PIL resampling codes the image processors store -> Preprocessing.interpolation. Not 0: the
# torchvision backend turns PIL's NEAREST into nearest-exact, which Preprocessing lacks.
RESAMPLE = {2: "bilinear", 3: "bicubic"}
# the keys an entry sets to describe the transform itself when the processor's cannot be read
OVERRIDE_KEYS = "input_size, resize_size, resize_mode, interpolation, mean, std"
# transformers 5 dropped its fx tracer (transformers.utils.fx); plain torch.fx is tried first
TRACE_NOTE = (
    ""
    if importlib.util.find_spec("transformers.utils.fx") is not None
    else f"transformers {transformers.__version__} has no fx tracer (transformers.utils.fx)"
)


def _fail(cfg: ModelConfig, message: str) -> ModelLoadError:
    return ModelLoadError(f"model {cfg.name!r}: {message}")


def _read_json(cfg: ModelConfig, file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise _fail(cfg, f"cannot read {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise _fail(cfg, f"{file} does not hold a JSON object")
    return data


def _no_remote_code(cfg: ModelConfig, file: Path, data: dict[str, Any]) -> None:
    """A description whose classes live in the directory's own Python files (auto_map) would
    run that code: refused, whatever the model_type says."""
    if data.get("auto_map"):
        raise _fail(
            cfg,
            f"{file} needs remote code (auto_map: {sorted(data['auto_map'])}); "
            "trust_remote_code is not supported: serve such a model through a factory that "
            "builds it from code you have reviewed",
        )


def weight_files(cfg: ModelConfig, folder: Path) -> list[Path]:
    """The files from_pretrained reads: the shards an index lists, or the single file;
    safetensors before .bin."""
    for index, single in WEIGHTS:
        if (folder / index).is_file():
            shards = sorted(set(_read_json(cfg, folder / index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if not shards or missing:
                raise _fail(cfg, f"{folder / index} lists missing shards: {missing or 'none'}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise _fail(
        cfg,
        f"{folder} has no weights file (model.safetensors, pytorch_model.bin or a sharded "
        "index); write them with model.save_pretrained(path), or set weights = 'none' with "
        "allow_random = true for random init from config.json",
    )


def _takes_pixels_first(cls: type) -> bool:
    params = list(inspect.signature(cls.forward).parameters)  # type: ignore[attr-defined]
    return len(params) > 1 and params[1] == "pixel_values"


def _auto_class(model_type: str) -> type | None:
    """AutoModel's class for a model type (the first, where the mapping lists several)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    names: Any = MODEL_MAPPING_NAMES.get(model_type)
    name = names[0] if isinstance(names, (list, tuple)) and names else names
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) else None


def _model_class(cfg: ModelConfig, config: Any) -> tuple[type, Any]:
    """(class, its config): the class config.json names, a vision-language model's tower, or
    AutoModel's class for the config."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and _takes_pixels_first(cls):
            return cls, config
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        tower = _auto_class(vision.model_type)
        with_projection = getattr(
            transformers, f"{getattr(tower, '__name__', '')}WithProjection", None
        )
        projection_dim = getattr(config, "projection_dim", None)
        if isinstance(with_projection, type) and projection_dim is not None:
            vision = type(vision).from_dict({**vision.to_dict(), "projection_dim": projection_dim})
            return with_projection, vision
        if tower is not None and _takes_pixels_first(tower):
            return tower, vision
    auto = _auto_class(config.model_type)
    if auto is not None and _takes_pixels_first(auto):
        return auto, config
    raise _fail(
        cfg,
        f"{config.model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}) is "
        "not an image model whose forward takes pixel_values first, nor a vision-language "
        "model with a vision tower",
    )


def _load(cfg: ModelConfig, folder: Path, cls: Any, config: Any, files: list[Path]) -> nn.Module:
    """from_pretrained offline, float32, strict: a weight the class expects and the files lack
    (or of another shape) is an error, not a silent random init. Keys the class does not use
    (a CLIP directory's text tower) are left out."""
    try:
        module, info = cls.from_pretrained(
            str(folder),
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=files[0].suffix == ".safetensors",
            weights_only=True,
            dtype=torch.float32,
            output_loading_info=True,
        )
    except Exception as exc:  # transformers raises many types for bad files and configs
        # without torch.load's advice to retry with weights_only=False (unsafe)
        raise _fail(cfg, f"cannot load {cls.__name__} from {folder}: {_torch_reason(exc)}") from exc
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        raise _fail(
            cfg,
            f"{folder}'s weights do not fit {cls.__name__}: missing {missing[:5]}, "
            f"shape mismatches {mismatched[:5]}",
        )
    return module  # type: ignore[no-any-return]


def prefix_tokens(module: nn.Module) -> int:
    """CLS / distillation / register tokens that lead the token outputs, read from the
    embeddings' parameters (ViT, DINOv2, BEiT: cls_token; CLIP: class_embedding; DeiT:
    distillation_token; DINOv2 with registers: register_tokens [1, n, C]); 0 without any
    (SigLIP, CNNs)."""
    for name, sub in module.named_modules():
        if name.split(".")[-1] != "embeddings":
            continue
        count = 0
        for attr in ("cls_token", "class_embedding", "distillation_token"):
            count += isinstance(getattr(sub, attr, None), torch.Tensor)
        registers = getattr(sub, "register_tokens", None)
        if isinstance(registers, torch.Tensor) and registers.dim() >= 2:
            count += int(registers.shape[-2])
        if count:
            return count
    return 0


# --- preprocessing ------------------------------------------------------------------------------
def _processor(cfg: ModelConfig, folder: Path) -> Any:
    file = folder / PROCESSOR
    if not file.is_file():
        raise _fail(
            cfg,
            f"{folder} has no {PROCESSOR}: the input transform comes from the image processor; "
            "write it with AutoImageProcessor.from_pretrained(<the model's processor>)"
            ".save_pretrained(path), or with e.g. ViTImageProcessor(size=..., image_mean=..., "
            "image_std=...).save_pretrained(path)",
        )
    _no_remote_code(cfg, file, _read_json(cfg, file))
    try:
        return transformers.AutoImageProcessor.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # an unknown image_processor_type, a malformed file
        raise _fail(cfg, f"cannot read the image processor in {file}: {exc}") from exc


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
        return _fail(
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
        raise _fail(
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
        raise _fail(cfg, f"{PROCESSOR} has rescale_factor {proc.rescale_factor}; set mean, std")
    normalize = bool(getattr(proc, "do_normalize", False))
    try:
        mean = _three(proc.image_mean if normalize else None, 0.0)
        std = _three(proc.image_std if normalize else None, 1.0)
    except ValueError:  # not three channels
        raise _fail(
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
        raise _fail(
            cfg,
            f"{PROCESSOR}'s {name} transforms images in its own way, which layertap's "
            f"preprocessing does not reproduce; describe it in the entry ({OVERRIDE_KEYS})",
        )
    if not described and getattr(proc, "do_pad", False) and getattr(proc, "pad_size", None):
        raise _fail(
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


# --- the source ---------------------------------------------------------------------------------
def build(cfg: ModelConfig) -> LoadedWeights:
    """The directory's model, loaded offline (remote code refused), in float32 and eval mode."""
    assert cfg.path is not None
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise _fail(cfg, f"path {folder} is not a directory (a save_pretrained() directory)")
    if not (folder / CONFIG).is_file():
        raise _fail(cfg, f"{folder} has no {CONFIG}; write it with model.save_pretrained(path)")
    _no_remote_code(cfg, folder / CONFIG, _read_json(cfg, folder / CONFIG))
    random_init = cfg.weights.lower() == "none"
    if random_init and not cfg.allow_random:
        raise _fail(cfg, "weights = 'none' needs allow_random = true")
    if not random_init and cfg.weights != "DEFAULT":
        raise _fail(
            cfg,
            f"weights = {cfg.weights!r}: a huggingface model's weights are its directory's own "
            "files (leave weights unset), or 'none' with allow_random = true for random init",
        )
    prep = functools.partial(entry_preprocessing, folder=folder)
    prep(cfg)  # before the weights: a transform that cannot be served fails cheaply
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # an unknown model_type, a malformed config
        raise _fail(cfg, f"cannot read {folder / CONFIG}: {exc}") from exc
    cls, config = _model_class(cfg, config)
    if random_init:
        module = cls(config).to(torch.float32)
        weights: tuple[str, str] = (RANDOM, RANDOM)
        note = f"random init of {cls.__name__} from config.json (weights = none)"
    else:
        files = weight_files(cfg, folder)
        module = _load(cfg, folder, cls, config, files)
        weights = (folder.name, sha256_files(files))
        note = f"{cls.__name__} from {', '.join(f.name for f in files)}"
    log.info("model %s: %s", cfg.name, note)
    return built(
        cfg,
        module,
        weights,
        random_init,
        note,
        prep,
        prefix_tokens=prefix_tokens(module),
        trace_note=TRACE_NOTE,
    )
