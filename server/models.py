"""What every model source shares (server/sources/ builds the models): the built-model record,
weights files read without pickle, digests, config-named imports, preprocessing overrides.

Weights never come from the network, and every checkpoint is read with weights_only=True or
safetensors (no pickle code runs).
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

import torch
from torch import nn

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
    """A built model with its weights, as one source made it (server/sources/)."""

    module: nn.Module
    weights_id: str
    sha256: str  # of the files actually loaded, or of the state dict (STATE_DIGEST), or random
    random: bool
    note: str
    preprocessing: Preprocessing
    # The model's own preprocessing for a config entry (its library's description, then the
    # entry's overrides): entries that share this module may differ in size, mean, submodule.
    preprocess_for: Callable[[ModelConfig], Preprocessing]
    # torch.fx rules of the model's library: module classes kept as leaves, functions wrapped
    leaf_modules: tuple[type, ...] = ()
    autowrap_functions: tuple[Any, ...] = ()
    # leading CLS/register tokens as the library describes the model (None: read the module,
    # catalog.default_prefix_tokens); an entry's prefix_tokens >= 0 overrides both
    prefix_tokens: int | None = None
    # what the source knows about tracing its models (a library without an fx tracer), said
    # before torch.fx's own error when the catalogue falls back to hooks
    trace_note: str = ""
    # "NHWC" when the library says the model's 4-D maps are channels-last (timm's output_fmt):
    # the catalogue's fallback where no probe can tell (catalog.build_catalog)
    map_layout: str = ""

    def for_entry(self, cfg: ModelConfig) -> LoadedWeights:
        """The same module and weights under another entry's preprocessing (shared weights)."""
        return dataclasses.replace(self, preprocessing=self.preprocess_for(cfg))


def built(
    cfg: ModelConfig,
    module: nn.Module,
    weights: tuple[str, str],
    random: bool,
    note: str,
    preprocess_for: Callable[[ModelConfig], Preprocessing],
    leaf_modules: tuple[type, ...] = (),
    autowrap_functions: tuple[Any, ...] = (),
    prefix_tokens: int | None = None,
    trace_note: str = "",
    map_layout: str = "",
) -> LoadedWeights:
    """What a source returns: the module in eval mode, (weights id, sha256), and the entry's
    preprocessing."""
    weights_id, sha = weights
    return LoadedWeights(
        module=module.eval(),
        weights_id=weights_id,
        sha256=sha,
        random=random,
        note=note,
        preprocessing=preprocess_for(cfg),
        preprocess_for=preprocess_for,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
        prefix_tokens=prefix_tokens,
        trace_note=trace_note,
        map_layout=map_layout,
    )


def base_key(cfg: ModelConfig) -> tuple[object, ...]:
    """Entries with equal keys share one base model (and its memory) on the device."""
    kwargs = tuple(sorted((k, repr(v)) for k, v in cfg.kwargs.items()))
    return (cfg.source, cfg.arch, cfg.factory, cfg.path, kwargs, cfg.weights, cfg.allow_random)


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
    """The file's sha256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One digest of several files (a sharded checkpoint): the sha256 of each file's relative
    name and sha256, in name order; one file alone gives that file's own sha256."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(f"{path.name}\t{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """A digest of the weights a module holds, for models whose weights come from no single
    file (a factory's own loading): sha256 over every state-dict entry's name, dtype, shape and
    bytes, in name order. Equal weights give equal digests across processes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "state:" + digest.hexdigest()


def apply_overrides(cfg: ModelConfig, base: Preprocessing, resize_ratio: float) -> Preprocessing:
    """The entry's own preprocessing keys over the model's: `input_size` sets the crop (and,
    unless `resize_size` is set too, the resize as crop x `resize_ratio`, the model's own
    resize-to-crop ratio), then resize_size, mean, std, interpolation, resize_kernel."""
    crop, resize = base.crop_size, base.resize_size
    if cfg.input_size is not None:
        crop = (int(cfg.input_size[0]), int(cfg.input_size[1]))
        resize = round(min(crop) * resize_ratio) if cfg.resize_size is None else resize
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
        resize_mode=cfg.resize_mode or base.resize_mode,
        crop_offset=base.crop_offset,
    )


def is_file_spec(weights: str) -> bool:
    """Whether `weights` names a local file (by extension or a path separator)."""
    return weights.endswith((".safetensors", ".pth", ".pt", ".bin")) or os.sep in weights


def _torch_reason(exc: BaseException) -> str:
    """torch.load's refusal, without its advice to retry with weights_only=False (unsafe)."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    unpickler = [ln for ln in lines if ln.startswith("WeightsUnpickler error")]
    if unpickler:
        return "the file holds pickled objects, not only tensors (" + unpickler[0] + ")"
    safe = [ln for ln in lines if "weights_only" not in ln and "Re-running" not in ln]
    return (safe or lines or [type(exc).__name__])[0][:300]


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
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


def load_weights_file(cfg: ModelConfig, module: nn.Module) -> tuple[str, str]:
    """Load the entry's weights file into `module` (strict); (weights id, sha256)."""
    state = load_state_dict_file(cfg.weights)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"model {cfg.name!r}: {cfg.weights} does not fit: {exc}") from exc
    return os.path.basename(cfg.weights), sha256_file(cfg.weights)
