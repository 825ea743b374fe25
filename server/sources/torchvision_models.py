"""torchvision models: any classification architecture (and detection models, through hooks or
a `submodule`), with a torchvision weights enum read from the local torch hub cache only, a local
file, or random init. Preprocessing: the weights' own transforms()."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from ..model_config import ModelConfig
from ..models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM,
    LoadedWeights,
    ModelLoadError,
    apply_overrides,
    built,
    is_file_spec,
    load_weights_file,
    sha256_file,
)
from ..preprocess import Preprocessing

log = logging.getLogger("layertap.server.models")


def classification_models() -> list[str]:
    """Every architecture clients may name through an `arch` entry: classification models and
    detection models (served through hooks at the top level, or a traceable `submodule`)."""
    return sorted(
        {
            *torchvision.models.list_models(module=torchvision.models),
            *detection_models(),
        }
    )


def detection_models() -> list[str]:
    return list(torchvision.models.list_models(module=torchvision.models.detection))


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps this enum's file; torchvision reads it from there without download."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _resolve_enum(cfg: ModelConfig) -> WeightsEnum | None:
    """The torchvision weights enum named by the entry, or None when it names a file/none."""
    if cfg.arch is None or cfg.weights.lower() == "none" or is_file_spec(cfg.weights):
        return None
    try:
        enum_cls = torchvision.models.get_model_weights(cfg.arch)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"model {cfg.name!r}: architecture {cfg.arch!r} has no weights"
        ) from exc
    name = cfg.weights.split(".")[-1]
    try:
        return enum_cls[name] if name != "DEFAULT" else enum_cls.DEFAULT
    except KeyError:
        options = ", ".join(w.name for w in enum_cls)
        raise ModelLoadError(
            f"model {cfg.name!r}: {cfg.weights!r} is not a weights name of {cfg.arch}; "
            f"use one of DEFAULT, {options}, a local file, or none"
        ) from None


def _detection_preprocessing(cfg: ModelConfig, module: nn.Module) -> Preprocessing | None:
    """Detection models (torchvision's GeneralizedRCNNTransform inside) have no classification
    preset. Default input: a square of the transform's min_size (320 for the *_320_fpn models,
    800 for most, 300 for SSD), shorter side resized to it then centre-cropped. At the top
    level the model normalises inside its transform, so the server sends [0, 1] pixels
    (mean 0, std 1); a `submodule` (e.g. backbone.body) runs after that transform, so it gets
    the transform's own mean/std. Each default yields to the entry's own settings."""
    transform = getattr(module, "transform", None)
    if transform is None or type(transform).__name__ != "GeneralizedRCNNTransform":
        return None
    size = int(transform.min_size[-1])
    if cfg.submodule:
        mean = tuple(float(m) for m in transform.image_mean)
        std = tuple(float(s) for s in transform.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Preprocessing(
        resize_size=size,
        crop_size=(size, size),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        resize_kernel=cfg.resize_kernel,
    )


def default_preprocessing(
    cfg: ModelConfig, module: nn.Module, enum: WeightsEnum | None
) -> Preprocessing:
    """The weights' own transforms; for random/file weights, the architecture's default ones;
    then the entry's overrides."""
    base: Preprocessing | None = _detection_preprocessing(cfg, module)
    detection = base is not None
    source = None if detection else enum
    if base is None and source is None and cfg.arch is not None:
        try:
            source = torchvision.models.get_model_weights(cfg.arch).DEFAULT
        except (ValueError, KeyError, AttributeError):
            source = None
    if source is not None:
        try:
            base = Preprocessing.from_torchvision(source.transforms())
        except ValueError:  # not an image-classification preset: use the ImageNet default
            base = None
    if base is None:
        base = Preprocessing(
            resize_size=256, crop_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD
        )
    # A randomly initialised ViT is built for its own image_size, not the default weights' size.
    image_size = getattr(module, "image_size", None)
    if enum is None and isinstance(image_size, int) and (image_size, image_size) != base.crop_size:
        base = dataclasses.replace(
            base, crop_size=(image_size, image_size), resize_size=round(image_size * 256 / 224)
        )
    ratio = 1.0 if detection else 256 / 224  # detection: resize straight to the crop
    return apply_overrides(cfg, base, ratio)


def build(cfg: ModelConfig) -> LoadedWeights:
    """A torchvision architecture with its weights on the CPU, in eval mode."""
    enum = _resolve_enum(cfg)
    random_init = False
    note = ""
    kwargs = dict(cfg.kwargs)
    assert cfg.arch is not None
    if cfg.arch not in classification_models():
        raise ModelLoadError(
            f"model {cfg.name!r}: unknown architecture {cfg.arch!r}; "
            "use a torchvision classification model name or a factory"
        )
    if enum is not None and not cached_weights_path(enum).is_file():
        if not cfg.allow_random:
            raise ModelLoadError(
                f"model {cfg.name!r}: weights {enum} are not cached at "
                f"{cached_weights_path(enum)} (no downloads at run time); place the file "
                "there, or set allow_random = true"
            )
        note = f"weights {enum} not cached at {cached_weights_path(enum)}: random init"
        log.warning("model %s: %s", cfg.name, note)
        enum, random_init = None, True
    if cfg.weights.lower() == "none":
        if not cfg.allow_random:
            raise ModelLoadError(f"model {cfg.name!r}: weights = 'none' needs allow_random = true")
        random_init, note = True, "random init (weights = none)"
    if cfg.arch in detection_models():
        # torchvision's detection builders download ImageNet backbone weights by default
        # when `weights` is None: never (offline), and never mixed into a random model.
        backbone = kwargs.get("weights_backbone")
        if backbone is not None and str(backbone).lower() != "none":
            raise ModelLoadError(
                f"model {cfg.name!r}: weights_backbone is not supported (no downloads); "
                "give the whole detection model's weights in `weights` (a cached "
                "torchvision enum or a local file)"
            )
        kwargs["weights_backbone"] = None
    # Force weights_only even inside torchvision's own loader.
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        module = torchvision.models.get_model(cfg.arch, weights=enum, **kwargs)
    except Exception as exc:  # a refused (weights_only) or corrupt cached file, bad kwargs
        where = f" from {cached_weights_path(enum)}" if enum is not None else ""
        raise ModelLoadError(f"model {cfg.name!r}: cannot build {cfg.arch}{where}: {exc}") from exc
    sha, weights_id = RANDOM, RANDOM
    if enum is not None:
        weights_id = f"{type(enum).__name__}.{enum.name}"
        sha = sha256_file(cached_weights_path(enum))
    elif is_file_spec(cfg.weights):
        weights_id, sha = load_weights_file(cfg, module)
    prep = functools.partial(default_preprocessing, module=module, enum=enum)
    return built(cfg, module, (weights_id, sha), random_init, note, prep)
