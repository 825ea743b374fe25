"""Ray Data batches in and out: which column holds the images, one image per row, and the
output columns (one per output key) added to a numpy (dict of arrays) or pandas batch.

Nothing here imports Ray or pandas: a batch is recognised by its type (a ``dict``, or an object
with pandas' ``DataFrame`` API), so the module works with whatever Ray version hands it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IMAGE_COLUMNS = ("image", "bytes", "path")
"""The columns looked for, in this order, when no ``column`` is given: ``image`` (encoded bytes,
or the decoded uint8 array ``read_images`` gives), ``bytes`` (``read_binary_files``), ``path``
(image files the actor can read)."""

Batch = Any
"""A Ray Data batch: ``dict[str, np.ndarray]`` (batch_format "numpy", the default) or a
``pandas.DataFrame`` (batch_format "pandas")."""


def is_pandas(batch: Batch) -> bool:
    return type(batch).__name__ == "DataFrame" and hasattr(batch, "columns")


def column_names(batch: Batch) -> list[str]:
    if isinstance(batch, Mapping):
        return [str(k) for k in batch.keys()]
    if is_pandas(batch):
        return [str(c) for c in batch.columns]
    raise TypeError(
        f"layertap.ray cannot read a batch of type {type(batch).__module__}."
        f"{type(batch).__name__}: use map_batches(..., batch_format='numpy') (the default) or "
        "batch_format='pandas'"
    )


def image_column(batch: Batch, column: str | None) -> str:
    """``column`` if given (KeyError naming the batch's columns when absent), else the first of
    :data:`IMAGE_COLUMNS` the batch has."""
    names = column_names(batch)
    if column is not None:
        if column not in names:
            raise KeyError(f"the batch has no column {column!r}; its columns: {names}")
        return column
    for name in IMAGE_COLUMNS:
        if name in names:
            return name
    raise KeyError(
        f"the batch has none of the image columns {list(IMAGE_COLUMNS)} (its columns: {names}); "
        "name the column holding the images with column="
    )


def row_images(batch: Batch, column: str) -> list[Any]:
    """The column's values, one image per row: ``bytes`` (encoded), a ``str`` path, or a numpy
    array (a [N, H, W, C] column gives its [H, W, C] rows)."""
    values = batch[column]
    if is_pandas(batch):
        values = values.to_numpy() if hasattr(values, "to_numpy") else np.asarray(values)
    return [_one_image(v) for v in values]


def _one_image(value: Any) -> Any:
    if isinstance(value, np.bytes_):
        return bytes(value)
    if isinstance(value, np.str_):
        return str(value)
    return value


def outputs_table(
    rows: Sequence[Mapping[str, np.ndarray] | None],
    template: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]] | None,
) -> dict[str, np.ndarray]:
    """One column per output key from each row's outputs (``None``: a failed row).

    A key whose rows share one shape and dtype becomes a dense [N, ...] array; otherwise
    (ragged outputs: raw maps at native resolution) an object array of the per-row arrays,
    which Ray stores as a variable-shaped tensor column. A failed row gets the key's ``template``
    shape (learned from successful rows) filled with NaN, or 0 for integer outputs (int8
    descriptors); ragged keys get an empty array with the rows' number of dimensions.
    """
    keys: list[str] = []
    for row in rows:
        if row is not None:
            keys = list(row)
            break
    if not keys and template is not None:
        keys = list(template)
    columns: dict[str, np.ndarray] = {}
    for key in keys:
        present = [row[key] for row in rows if row is not None]
        specs = {(a.shape, a.dtype) for a in present}
        if not specs and template is not None:
            specs = {template[key]}
        if len(specs) == 1:
            shape, dtype = specs.pop()
            column = np.empty((len(rows), *shape), dtype=dtype)
            for i, row in enumerate(rows):
                column[i] = row[key] if row is not None else _missing(dtype)
        else:
            ndim = present[0].ndim
            dtype = present[0].dtype
            column = np.empty(len(rows), dtype=object)
            for i, row in enumerate(rows):
                column[i] = row[key] if row is not None else np.zeros((0,) * ndim, dtype)
        columns[key] = column
    return columns


def _missing(dtype: np.dtype[Any]) -> Any:
    return np.nan if dtype.kind == "f" else 0


def with_columns(
    batch: Batch, columns: Mapping[str, np.ndarray], drop: Sequence[str] = ()
) -> Batch:
    """``batch`` (not changed) with ``columns`` added and ``drop`` left out; a new dict or
    DataFrame. A column already in the batch is never replaced: ValueError."""
    names = set(column_names(batch))
    clash = sorted(names & set(columns))
    if clash:
        raise ValueError(
            f"the output columns {clash} would replace input columns of the same names; name "
            "the outputs otherwise with nodes={node: key, ...} (or error_column=)"
        )
    if is_pandas(batch):
        out = batch.drop(columns=list(drop)) if drop else batch.copy(deep=False)
        for name, column in columns.items():
            out[name] = list(column) if column.ndim > 1 or column.dtype == object else column
        return out
    result = {k: v for k, v in batch.items() if k not in drop}
    result.update(columns)
    return result
