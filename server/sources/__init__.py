"""Model sources: one module per place a model comes from, each turning a config entry into a
built module with its weights, digest, preprocessing and tracing rules (models.LoadedWeights).
To add a source: a module here with `build(cfg)`, its name in model_config.SOURCES, and a
branch below. A source's library is imported only when an entry uses it."""

from __future__ import annotations

from ..model_config import ModelConfig
from ..models import LoadedWeights, ModelLoadError


def build_model(cfg: ModelConfig) -> LoadedWeights:
    """The entry's model on the CPU, in eval mode, offline."""
    if cfg.source == "torchvision":
        from . import torchvision_models

        return torchvision_models.build(cfg)
    if cfg.source == "factory":
        from . import factory

        return factory.build(cfg)
    if cfg.source == "timm":
        from . import timm_models

        return timm_models.build(cfg)
    if cfg.source == "huggingface":
        from . import hf_models

        return hf_models.build(cfg)
    if cfg.source == "export":
        from . import exported

        return exported.build(cfg)
    raise ModelLoadError(f"model {cfg.name!r}: unknown source {cfg.source!r}")
