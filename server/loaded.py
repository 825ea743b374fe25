"""LoadedModel: what one device holds for one served entry (weights, catalogue, extractor cache).

A record of its own so that loading (which builds it), the extractor cache (which fills it) and
the worker (which runs it) all depend on it, and none of them on each other in a cycle.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .catalog import Catalog
from .models import LoadedWeights
from .settings import ModelConfig


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: LoadedWeights
    catalog: Catalog
    modules: list[tuple[str, str, int]]
    n_prefix_tokens: int
    # fx.GraphModule, or its torch.compile wrapper when the model is compiled
    extractors: OrderedDict[tuple[str, ...], torch.nn.Module] = field(default_factory=OrderedDict)
    # uses of each node set, cached or not (extractors.py: which sets the cache keeps)
    extractor_uses: dict[tuple[str, ...], int] = field(default_factory=dict)
    autocast: torch.dtype | None = None
    # conv + BatchNorm pairs folded into one convolution, shared by this model's extractors
    folded: dict[tuple[str, str], torch.nn.Module] = field(default_factory=dict)
    # weights and input batches in channels-last memory format (config, or chosen at load)
    channels_last: bool = False
    # compile = "auto" chose compiled (server/auto_compile.py): takes each new eager extractor,
    # queues its compile on the background thread and returns the extractor to cache (eager
    # until each batch size is compiled)
    compile_job: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    compile_seconds: float = 0.0  # spent compiling at load
