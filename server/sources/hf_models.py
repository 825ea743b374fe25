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
    _torch_reason,
    built,
    sha256_files,
)
from .hf_preprocess import entry_preprocessing, fail, no_remote_code, read_json

log = logging.getLogger("layertap.server.models")

CONFIG = "config.json"
# (index file, single file) of each weights format, in the order from_pretrained prefers them
WEIGHTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# transformers 5 dropped its fx tracer (transformers.utils.fx); plain torch.fx is tried first
TRACE_NOTE = (
    ""
    if importlib.util.find_spec("transformers.utils.fx") is not None
    else f"transformers {transformers.__version__} has no fx tracer (transformers.utils.fx)"
)


def weight_files(cfg: ModelConfig, folder: Path) -> list[Path]:
    """The files from_pretrained reads: the shards an index lists, or the single file;
    safetensors before .bin."""
    for index, single in WEIGHTS:
        if (folder / index).is_file():
            shards = sorted(set(read_json(cfg, folder / index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if not shards or missing:
                raise fail(cfg, f"{folder / index} lists missing shards: {missing or 'none'}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise fail(
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
    raise fail(
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
        raise fail(cfg, f"cannot load {cls.__name__} from {folder}: {_torch_reason(exc)}") from exc
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        raise fail(
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


# --- the source ---------------------------------------------------------------------------------
def build(cfg: ModelConfig) -> LoadedWeights:
    """The directory's model, loaded offline (remote code refused), in float32 and eval mode."""
    assert cfg.path is not None
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise fail(cfg, f"path {folder} is not a directory (a save_pretrained() directory)")
    if not (folder / CONFIG).is_file():
        raise fail(cfg, f"{folder} has no {CONFIG}; write it with model.save_pretrained(path)")
    no_remote_code(cfg, folder / CONFIG, read_json(cfg, folder / CONFIG))
    random_init = cfg.weights.lower() == "none"
    if random_init and not cfg.allow_random:
        raise fail(cfg, "weights = 'none' needs allow_random = true")
    if not random_init and cfg.weights != "DEFAULT":
        raise fail(
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
        raise fail(cfg, f"cannot read {folder / CONFIG}: {exc}") from exc
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
