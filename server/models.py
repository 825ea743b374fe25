"""Build a configured model with its weights, offline. Runs on the device worker thread only.

Weights never come from the network: a torchvision weights enum is used only when its file is
already in $TORCH_HOME/hub/checkpoints; otherwise the entry must allow random init. Every
checkpoint is read with weights_only=True (no pickle code runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from .preprocess import Preprocessing
from .settings import ModelConfig

log = logging.getLogger(__name__)

RANDOM = "random"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ModelLoadError(RuntimeError):
    """The model cannot be built as configured; the message says what to fix (plain text:
    torch's own messages carry terminal colour codes, which are stripped)."""

    def __init__(self, message: str) -> None:
        super().__init__(_ANSI.sub("", message))


@dataclass
class LoadedWeights:
    module: nn.Module
    weights_id: str
    sha256: str
    random: bool
    note: str
    preprocessing: Preprocessing
    # the torchvision weights actually loaded (their transforms define the preprocessing)
    enum: WeightsEnum | None = None

    def for_entry(self, cfg: ModelConfig) -> LoadedWeights:
        """The same module and weights under another entry's preprocessing (shared weights)."""
        return dataclasses.replace(
            self, preprocessing=_default_preprocessing(cfg, self.module, self.enum)
        )


def base_key(cfg: ModelConfig) -> tuple[object, ...]:
    """Entries with equal keys share one base model (and its memory) on the device."""
    kwargs = tuple(sorted((k, repr(v)) for k, v in cfg.kwargs.items()))
    return (cfg.arch, cfg.factory, kwargs, cfg.weights, cfg.allow_random)


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


def _import_file(path: str) -> ModuleType:
    """A factory module given as a .py file (a config-relative path made absolute by
    settings.parse_model), imported once under a name derived from its path."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ImportError(f"no such file: {file}")
    name = "layertap_factory_" + hashlib.sha1(str(file).encode()).hexdigest()[:12] + "_" + file.stem
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def import_object(spec: str) -> Any:
    """'package.module:attr' (importable from sys.path) or 'path/to/file.py:attr' → the object
    (config-only; clients never reach this)."""
    module_name, _, attr = spec.rpartition(":") if ".py:" in spec else spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(
            f"{spec!r} is not of the form 'package.module:name' or 'path/to/file.py:name'"
        )
    try:
        obj: Any = (
            _import_file(module_name)
            if module_name.endswith(".py")
            else importlib.import_module(module_name)
        )
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import {spec!r}: {exc}") from exc
    return obj


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps this enum's file; torchvision reads it from there without download."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _resolve_enum(cfg: ModelConfig) -> WeightsEnum | None:
    """The torchvision weights enum named by the entry, or None when it names a file/none."""
    if cfg.arch is None or cfg.weights.lower() == "none" or _is_file_spec(cfg.weights):
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


def _is_file_spec(weights: str) -> bool:
    return weights.endswith((".safetensors", ".pth", ".pt", ".bin")) or os.sep in weights


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


def _default_preprocessing(
    cfg: ModelConfig, module: nn.Module, enum: WeightsEnum | None
) -> Preprocessing:
    """The weights' own transforms; for random/file weights, the architecture's default ones."""
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
    crop = base.crop_size
    resize = base.resize_size
    # A randomly initialised ViT is built for its own image_size, not the default weights' size.
    image_size = getattr(module, "image_size", None)
    if enum is None and isinstance(image_size, int) and (image_size, image_size) != crop:
        crop = (image_size, image_size)
        resize = round(image_size * 256 / 224)
    if cfg.input_size is not None:
        crop = (int(cfg.input_size[0]), int(cfg.input_size[1]))
        ratio = 1.0 if detection else 256 / 224  # detection: resize straight to the crop
        resize = round(min(crop) * ratio) if cfg.resize_size is None else resize
    if cfg.resize_size is not None:
        resize = cfg.resize_size or None
    return Preprocessing(
        resize_size=resize,
        crop_size=crop,
        mean=tuple(cfg.mean) if cfg.mean else base.mean,  # type: ignore[arg-type]
        std=tuple(cfg.std) if cfg.std else base.std,  # type: ignore[arg-type]
        interpolation=cfg.interpolation or base.interpolation,
        antialias=base.antialias,
        resize_kernel=cfg.resize_kernel,
    )


def _torch_reason(exc: BaseException) -> str:
    """torch.load's refusal, without its advice to retry with weights_only=False (unsafe)."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    unpickler = [ln for ln in lines if ln.startswith("WeightsUnpickler error")]
    if unpickler:
        return "the file holds pickled objects, not only tensors (" + unpickler[0] + ")"
    safe = [ln for ln in lines if "weights_only" not in ln and "Re-running" not in ln]
    return (safe or lines or [type(exc).__name__])[0][:300]


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ModelLoadError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return dict(load_file(path, device="cpu"))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"cannot load {path} as safetensors: {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad/pickled files
        reason = _torch_reason(exc)
        raise ModelLoadError(f"cannot load {path} with weights_only=True: {reason}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    return state


def build_model(cfg: ModelConfig) -> LoadedWeights:
    """Construct the module with weights on the CPU, in eval mode."""
    enum = _resolve_enum(cfg)
    random_init = False
    note = ""
    kwargs = dict(cfg.kwargs)
    if cfg.arch is not None:
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
                raise ModelLoadError(
                    f"model {cfg.name!r}: weights = 'none' needs allow_random = true"
                )
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
            raise ModelLoadError(
                f"model {cfg.name!r}: cannot build {cfg.arch}{where}: {exc}"
            ) from exc
    else:
        assert cfg.factory is not None
        factory: Callable[..., nn.Module] = import_object(cfg.factory)
        module = factory(**kwargs)
        if not isinstance(module, nn.Module):
            raise ModelLoadError(
                f"factory {cfg.factory} returned {type(module).__name__}, not a Module"
            )
        if cfg.weights.lower() in ("none", "default"):
            random_init = cfg.weights.lower() == "none"
            note = "factory weights" if not random_init else "random init (weights = none)"
            if random_init and not cfg.allow_random:
                raise ModelLoadError(
                    f"model {cfg.name!r}: weights = 'none' needs allow_random = true"
                )

    sha, weights_id = RANDOM, RANDOM
    if enum is not None:
        weights_id = f"{type(enum).__name__}.{enum.name}"
        sha = sha256_file(cached_weights_path(enum))
    elif _is_file_spec(cfg.weights):
        state = _load_state_dict_file(cfg.weights)
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(f"model {cfg.name!r}: {cfg.weights} does not fit: {exc}") from exc
        weights_id, sha = os.path.basename(cfg.weights), sha256_file(cfg.weights)
    elif cfg.factory is not None and not random_init:
        weights_id, sha = "factory", "factory"
    module.eval()
    return LoadedWeights(
        module=module,
        weights_id=weights_id,
        sha256=sha,
        random=random_init,
        note=note,
        preprocessing=_default_preprocessing(cfg, module, enum),
        enum=enum,
    )
