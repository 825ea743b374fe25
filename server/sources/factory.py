"""Factory models: "package.module:callable" (or a config-relative "file.py:callable") returning
an nn.Module, with a local weights file, the factory's own weights, or random init. The import
path comes from the config only. Preprocessing: the ImageNet default unless the entry sets it."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from ..model_config import ModelConfig
from ..models import (
    RANDOM,
    LoadedWeights,
    ModelLoadError,
    built,
    import_object,
    is_file_spec,
    load_weights_file,
    state_sha256,
)
from .torchvision_models import default_preprocessing


def build(cfg: ModelConfig) -> LoadedWeights:
    """Call the factory; its own weights are digested from the state dict it holds."""
    assert cfg.factory is not None
    factory: Callable[..., nn.Module] = import_object(cfg.factory)
    module = factory(**dict(cfg.kwargs))
    if not isinstance(module, nn.Module):
        got = type(module).__name__
        raise ModelLoadError(f"factory {cfg.factory} returned {got}, not a Module")
    random_init = cfg.weights.lower() == "none"
    if random_init and not cfg.allow_random:
        raise ModelLoadError(f"model {cfg.name!r}: weights = 'none' needs allow_random = true")
    if random_init:
        weights_id, sha, note = RANDOM, RANDOM, "random init (weights = none)"
    elif is_file_spec(cfg.weights):
        (weights_id, sha), note = load_weights_file(cfg, module), ""
    else:  # the factory's own weights: no file of ours to digest, so digest what it holds
        weights_id, sha, note = "factory", state_sha256(module), "factory weights"
    prep = functools.partial(default_preprocessing, module=module, enum=None)
    return built(cfg, module, (weights_id, sha), random_init, note, prep)
