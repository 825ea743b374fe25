"""The PCA / whitening head file format (`layertap-head-v1`): its one writer and one reader.

The client writes head files (`layertap fit-whitening`) and the server loads them (`[[heads]]`);
both go through this module, in numpy only, so the two sides cannot disagree on what a valid
file is and the client still installs without torch. Files are read with `allow_pickle=False`,
so a head file can never run code. Every problem is a ValueError that names the file and says
what is wrong, so a bad head stops the server at start-up with a message an operator can act on.

File format (an `.npz` written by np.savez; keys):
- `format`: 0-d str array, "layertap-head-v1"
- `mean`: float [D]
- `components`: float [K, D], rows = principal axes in decreasing variance, K <= D
- `eigvals`: float [K], descending, > 0 (the variance along each axis)
- `model` (optional): 0-d str, the model the head was fitted on ("" = any)
- `nodes` (optional): 1-d str array, the nodes it was fitted on (informative)
- `pool` (optional): 0-d str, the pooling it was fitted on (informative)
- `n_samples` (optional): 0-d int, how many descriptors it was fitted on (informative)
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

FORMAT = "layertap-head-v1"
REQUIRED_KEYS = ("format", "mean", "components", "eigvals")


@dataclass(frozen=True, eq=False)
class HeadArrays:
    """The contents of one head file, checked: float32 arrays and the fitting metadata
    (identity-compared: holds arrays)."""

    mean: np.ndarray  # [D]
    components: np.ndarray  # [K, D]
    eigvals: np.ndarray  # [K]
    model: str = ""  # "" = usable with any model
    nodes: tuple[str, ...] = ()
    pool: str = ""
    n_samples: int | None = None  # None = not recorded (the key is absent)


def write_head(target: str | Path | IO[bytes], head: HeadArrays) -> None:
    """Write `head` as a head file; `target` is a binary file or a path (np.savez's rule: a
    path not ending in `.npz` gets it appended). Arrays are stored as float32, strings as
    plain unicode arrays, so the reader never needs pickle."""
    # Any: numpy's stubs read **kwds against savez's keyword `allow_pickle: bool`
    arrays: dict[str, Any] = {
        "format": np.asarray(FORMAT),
        "mean": np.asarray(head.mean, dtype=np.float32),
        "components": np.asarray(head.components, dtype=np.float32),
        "eigvals": np.asarray(head.eigvals, dtype=np.float32),
        "model": np.asarray(head.model),
        "nodes": _str_array(head.nodes),
        "pool": np.asarray(head.pool),
    }
    if head.n_samples is not None:
        arrays["n_samples"] = np.asarray(head.n_samples, dtype=np.int64)
    np.savez(target, **arrays)


def read_head(path: str | Path | IO[bytes], where: str = "") -> HeadArrays:
    """Read and check a head file. `where` starts every error message (default: the path),
    so each side can say which head of its own it was reading."""
    where = where or str(path)
    arrays = _read_arrays(path, where)
    fmt = _str_scalar(arrays["format"], "format", where)
    if fmt != FORMAT:
        raise ValueError(f"{where}: format is {fmt!r}; this version of layertap reads {FORMAT!r}")
    mean = _float_array(arrays["mean"], "mean", where, 1)
    components = _float_array(arrays["components"], "components", where, 2)
    eigvals = _float_array(arrays["eigvals"], "eigvals", where, 1)
    _check_shapes(mean, components, eigvals, where)
    return HeadArrays(
        mean=mean,
        components=components,
        eigvals=eigvals,
        model=_optional_str(arrays, "model", where),
        nodes=_nodes(arrays, where),
        pool=_optional_str(arrays, "pool", where),
        n_samples=_n_samples(arrays, where),
    )


def _read_arrays(path: str | Path | IO[bytes], where: str) -> dict[str, np.ndarray]:
    """Every array of the archive, without pickle; the required keys present."""
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
    return arrays


def _check_shapes(
    mean: np.ndarray, components: np.ndarray, eigvals: np.ndarray, where: str
) -> None:
    """mean [D], components [K, D] with 0 < K <= D, eigvals [K] positive and descending."""
    d = mean.shape[0]
    k = components.shape[0]
    if d == 0 or k == 0:
        raise ValueError(f"{where}: empty head (mean {mean.shape}, components {components.shape})")
    if components.shape[1] != d:
        raise ValueError(
            f"{where}: shapes disagree: components has shape {components.shape} but mean has "
            f"{d} values; components must be [K, {d}]"
        )
    if k > d:
        raise ValueError(f"{where}: components has {k} rows, more than the dimension {d}")
    if eigvals.shape[0] != k:
        raise ValueError(
            f"{where}: shapes disagree: eigvals has {eigvals.shape[0]} values, components {k} rows"
        )
    if not (eigvals > 0).all():
        raise ValueError(
            f"{where}: eigvals must all be > 0 (smallest is {float(eigvals.min())}); "
            "drop components with zero variance when fitting"
        )
    if (np.diff(eigvals) > 0).any():
        raise ValueError(f"{where}: eigvals must be in descending order (largest variance first)")


def _str_array(values: Sequence[str]) -> np.ndarray:
    """A 1-d unicode array, also when empty (np.asarray([]) would be float64)."""
    return np.asarray(list(values), dtype=np.str_) if values else np.zeros(0, dtype="<U1")


def _str_scalar(arr: np.ndarray, key: str, where: str) -> str:
    if arr.ndim != 0 or arr.dtype.kind not in "US":
        raise ValueError(f"{where}: '{key}' must be a 0-d string array, got {_describe(arr)}")
    value = arr.item()
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional_str(arrays: Mapping[str, np.ndarray], key: str, where: str) -> str:
    return _str_scalar(arrays[key], key, where) if key in arrays else ""


def _nodes(arrays: Mapping[str, np.ndarray], where: str) -> tuple[str, ...]:
    if "nodes" not in arrays:
        return ()
    arr = arrays["nodes"]
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "US"):
        raise ValueError(f"{where}: 'nodes' must be a 1-d string array, got {_describe(arr)}")
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in arr.tolist())


def _n_samples(arrays: Mapping[str, np.ndarray], where: str) -> int | None:
    if "n_samples" not in arrays:
        return None
    arr = arrays["n_samples"]
    if arr.ndim != 0 or arr.dtype.kind not in "iu" or int(arr) < 0:
        raise ValueError(
            f"{where}: 'n_samples' must be a 0-d non-negative integer, got {_describe(arr)}"
        )
    return int(arr)


def _float_array(arr: np.ndarray, key: str, where: str, ndim: int) -> np.ndarray:
    """`arr` as float32 (float64 files are accepted and converted), finite."""
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
