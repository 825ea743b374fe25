"""Named post-processing heads: PCA / PCA-whitening parameters fitted offline, loaded at start-up.

A head is a `layertap-head-v1` `.npz` (`layertap fit-whitening` writes them; the format, its
writer and its checking reader are `layertap.common.heads_format`, shared with the client).
Clients pick heads by name; they never upload files. This module turns a checked file into
torch tensors and checks what only the server knows: the model its config binds the head to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from layertap.common.heads_format import FORMAT as HEAD_FORMAT
from layertap.common.heads_format import REQUIRED_KEYS, HeadArrays, read_head, write_head

__all__ = ["HEAD_FORMAT", "REQUIRED_KEYS", "Head", "load_head", "save_head"]


@dataclass(frozen=True, eq=False)
class Head:
    """PCA parameters of one named head, float32 CPU tensors (identity-compared: holds tensors)."""

    name: str
    model: str  # "" = usable with any model
    mean: torch.Tensor  # [D]
    components: torch.Tensor  # [K, D]
    eigvals: torch.Tensor  # [K]
    nodes: tuple[str, ...] = ()
    pool: str = ""

    @property
    def input_dim(self) -> int:
        """D: the descriptor size the head accepts."""
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        """K: how many components it holds (the largest `dim` a request may ask for)."""
        return int(self.components.shape[0])


def load_head(name: str, path: str | Path, model: str = "") -> Head:
    """Read and validate a head file; `model` (from the config, "" = any) must agree with the
    file's own model when both are set."""
    where = f"head {name!r} ({path})"
    arrays = read_head(path, where)
    if model and arrays.model and model != arrays.model:
        raise ValueError(
            f"{where}: the file was fitted on model {arrays.model!r} but the config binds it to "
            f"{model!r}"
        )
    return Head(
        name=name,
        model=model or arrays.model,
        mean=torch.from_numpy(arrays.mean),
        components=torch.from_numpy(arrays.components),
        eigvals=torch.from_numpy(arrays.eigvals),
        nodes=arrays.nodes,
        pool=arrays.pool,
    )


def save_head(
    path: str | Path,
    mean: np.ndarray,
    components: np.ndarray,
    eigvals: np.ndarray,
    model: str = "",
    nodes: Sequence[str] = (),
    pool: str = "",
) -> None:
    """Write a head file in the format load_head reads (tests and tools; the client's
    `fit-whitening` writes the same format through the same shared writer)."""
    write_head(path, HeadArrays(mean, components, eigvals, model, tuple(nodes), pool))
