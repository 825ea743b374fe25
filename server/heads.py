"""Named post-processing heads: PCA / PCA-whitening parameters fitted offline, loaded at start-up.

A head is a `.npz` written with numpy (`layertap fit-whitening` writes them) and read with
`allow_pickle=False`, so a head file can never run code. Clients pick heads by name; they never
upload files. Every problem with a file is a ValueError that names the file and says what is
wrong, so a bad head stops the server at start-up with a message an operator can act on.

File format (keys):
- `format`: 0-d str array, "layertap-head-v1"
- `mean`: float [D]
- `components`: float [K, D], rows = principal axes in decreasing variance, K <= D
- `eigvals`: float [K], descending, > 0 (the variance along each axis)
- `model` (optional): 0-d str, the model the head was fitted on ("" = any)
- `nodes` (optional): 1-d str array, the nodes it was fitted on (informative)
- `pool` (optional): 0-d str, the pooling it was fitted on (informative)
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HEAD_FORMAT = "layertap-head-v1"
REQUIRED_KEYS = ("format", "mean", "components", "eigvals")


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


def _str_scalar(arr: np.ndarray, key: str, where: str) -> str:
    if arr.ndim != 0 or arr.dtype.kind not in "US":
        raise ValueError(f"{where}: '{key}' must be a 0-d string array, got {_describe(arr)}")
    value = arr.item()
    return value.decode() if isinstance(value, bytes) else str(value)


def _float_array(arr: np.ndarray, key: str, where: str, ndim: int) -> np.ndarray:
    if arr.dtype.kind != "f":
        raise ValueError(
            f"{where}: '{key}' must be a floating-point array (float32), got {_describe(arr)}"
        )
    if arr.ndim != ndim:
        raise ValueError(f"{where}: '{key}' must have {ndim} dimension(s), got shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
        out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{where}: '{key}' holds NaN or infinite values (in float32)")
    return out


def _describe(arr: np.ndarray) -> str:
    return f"dtype {arr.dtype}, shape {arr.shape}"


def load_head(name: str, path: str | Path, model: str = "") -> Head:
    """Read and validate a head file; `model` (from the config, "" = any) must agree with the
    file's own model when both are set."""
    where = f"head {name!r} ({path})"
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{where}: file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{where}: not a readable .npz file: {e}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{where}: expected an .npz archive (np.savez), got a single .npy array")
    with loaded as npz:
        missing = [k for k in REQUIRED_KEYS if k not in npz.files]
        if missing:
            raise ValueError(
                f"{where}: missing key(s) {', '.join(missing)}; a head file needs "
                f"{', '.join(REQUIRED_KEYS)} (write it with `layertap fit-whitening`)"
            )
        arrays: dict[str, np.ndarray] = {}
        for key in npz.files:
            try:
                arrays[key] = npz[key]
            except ValueError as e:  # object arrays need pickle, which is refused
                raise ValueError(
                    f"{where}: key '{key}' cannot be read without pickle ({e}); "
                    "store plain numeric and string arrays only"
                ) from None
    fmt = _str_scalar(arrays["format"], "format", where)
    if fmt != HEAD_FORMAT:
        raise ValueError(f"{where}: format is {fmt!r}; this server reads {HEAD_FORMAT!r}")
    mean = _float_array(arrays["mean"], "mean", where, 1)
    components = _float_array(arrays["components"], "components", where, 2)
    eigvals = _float_array(arrays["eigvals"], "eigvals", where, 1)
    d = mean.shape[0]
    k = components.shape[0]
    if d == 0 or k == 0:
        raise ValueError(f"{where}: empty head (mean {mean.shape}, components {components.shape})")
    if components.shape[1] != d:
        raise ValueError(
            f"{where}: components has shape {components.shape} but mean has {d} values; "
            f"components must be [K, {d}]"
        )
    if k > d:
        raise ValueError(f"{where}: components has {k} rows, more than the dimension {d}")
    if eigvals.shape[0] != k:
        raise ValueError(f"{where}: eigvals has {eigvals.shape[0]} values, components {k} rows")
    if not (eigvals > 0).all():
        raise ValueError(
            f"{where}: eigvals must all be > 0 (smallest is {float(eigvals.min())}); "
            "drop components with zero variance when fitting"
        )
    if (np.diff(eigvals) > 0).any():
        raise ValueError(f"{where}: eigvals must be in descending order (largest variance first)")
    file_model = _str_scalar(arrays["model"], "model", where) if "model" in arrays else ""
    if model and file_model and model != file_model:
        raise ValueError(
            f"{where}: the file was fitted on model {file_model!r} but the config binds it to "
            f"{model!r}"
        )
    nodes: tuple[str, ...] = ()
    if "nodes" in arrays:
        arr = arrays["nodes"]
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "US"):
            raise ValueError(f"{where}: 'nodes' must be a 1-d string array, got {_describe(arr)}")
        nodes = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in arr.tolist())
    pool = _str_scalar(arrays["pool"], "pool", where) if "pool" in arrays else ""
    return Head(
        name=name,
        model=model or file_model,
        mean=torch.from_numpy(mean),
        components=torch.from_numpy(components),
        eigvals=torch.from_numpy(eigvals),
        nodes=nodes,
        pool=pool,
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
    """Write a head file in the format load_head reads (tests and tools; the client has its own
    numpy-only writer)."""
    np.savez(
        path,
        format=np.array(HEAD_FORMAT),
        mean=np.asarray(mean, dtype=np.float32),
        components=np.asarray(components, dtype=np.float32),
        eigvals=np.asarray(eigvals, dtype=np.float32),
        model=np.array(model),
        nodes=np.array(list(nodes), dtype=str),
        pool=np.array(pool),
    )
