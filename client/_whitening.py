"""PCA and PCA-whitening heads for descriptors, fitted offline with numpy only (no torch).

A head is what the server's ``center`` / ``pca`` / ``whiten`` post steps apply: the mean of a
sample of L2-normalised descriptors, the principal axes of their covariance (rows, decreasing
variance) and the variance along each axis. ``layertap fit-whitening`` fits one over a folder
of images and writes it as the ``.npz`` the server loads (``[[heads]]`` in its config).

Whitening divides by ``sqrt(eigval)``, so the small eigenvalues of a covariance estimated
from few images would blow up noise along the least reliable axes. Two regularisations,
both applied to the stored eigenvalues only (axes and PCA projections are unchanged):

- ``shrinkage`` a (0..1): Ledoit-Wolf style shrinkage of the covariance towards a scaled
  identity, ``(1 - a) C + a (trace C / D) I``, whose eigenvalues are
  ``(1 - a) l_i + a trace(C) / D`` on the same axes;
- a floor of ``EIGVAL_FLOOR`` times the largest eigenvalue, so every stored eigenvalue is
  strictly positive (the file format requires it) even with ``shrinkage = 0``.

The head file itself (``layertap-head-v1``: writer, checking reader) is
``layertap.common.heads_format``, the one definition the server reads with too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from layertap.common.heads_format import FORMAT as FORMAT  # re-exported: the client's name
from layertap.common.heads_format import HeadArrays, read_head, write_head

EIGVAL_FLOOR = 1e-6  # relative to the largest eigenvalue
# Eigenvalues below this fraction of the largest are numerically zero: their axes are noise
# (duplicates, or more dimensions than images) and are never kept.
RANK_TOL = 1e-9


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm (float32); a zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)


def concat_parts(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The server's multi-node descriptor: each part L2-normalised, concatenated, L2 again."""
    return l2_normalize(np.concatenate([l2_normalize(p) for p in parts], axis=-1))


@dataclass(frozen=True)
class Whitening:
    """A fitted head: ``mean`` [D], ``components`` [K, D] (orthonormal rows, decreasing
    variance), ``eigvals`` [K] (descending, > 0), and what it was fitted on."""

    mean: np.ndarray
    components: np.ndarray
    eigvals: np.ndarray
    model: str = ""
    nodes: tuple[str, ...] = ()
    pool: str = ""
    n_samples: int = 0
    variance_kept: float = math.nan  # fraction of the sample's variance on the kept axes

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray, *, whiten: bool = True, dim: int = 0) -> np.ndarray:
        """What the server's ``pca:HEAD:dim`` / ``whiten:HEAD:dim`` step computes:
        ``components[:dim] (x - mean)``, divided by ``sqrt(eigvals[:dim])`` when whitening,
        then L2-normalised. ``dim`` 0 keeps every component."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.input_dim:
            raise ValueError(
                f"descriptors have {x.shape[-1]} values but the head was fitted on "
                f"{self.input_dim}-d descriptors"
            )
        k = dim or self.n_components
        if not 0 < k <= self.n_components:
            raise ValueError(f"dim {dim} is out of range: the head has {self.n_components}")
        y = (x - self.mean) @ self.components[:k].T
        if whiten:
            y = y / np.sqrt(self.eigvals[:k])
        return l2_normalize(y)


def fit(
    x: np.ndarray,
    *,
    dim: int = 0,
    shrinkage: float = 0.0,
    model: str = "",
    nodes: Sequence[str] = (),
    pool: str = "",
) -> Whitening:
    """Fit a head on descriptors ``x`` [n, D] (one row per image, as given: normalise them
    first if the server will). ``dim`` 0 keeps every axis with non-zero variance.

    Raises ValueError when fewer than 2 descriptors are given, when ``dim`` exceeds
    ``min(n - 1, D)`` (n descriptors span at most n - 1 directions around their mean), or
    when it exceeds the number of directions the data actually varies in.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be a 2-d array [images, values], got {x.shape}")
    n, d = x.shape
    if n < 2:
        raise ValueError(
            f"whitening needs descriptors of at least 2 images, got {n}; "
            "fit it on a folder of images like the ones you will search"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("descriptors contain NaN or infinite values")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    limit = min(n - 1, d)
    if dim < 0 or dim > limit:
        raise ValueError(
            f"--dim {dim} is too large: {n} images of {d}-d descriptors give at most "
            f"min(n - 1, D) = {limit} components; use --dim {limit} or less, or fit on "
            "more images"
        )
    mean = x.mean(axis=0)
    xc = x - mean
    total_var = float(np.einsum("ij,ij->", xc, xc)) / (n - 1)  # trace of the covariance
    if n - 1 < d:
        # Same non-zero spectrum, from the n x n Gram matrix instead of the D x D covariance:
        # C = Xc^T Xc / (n-1); if Xc Xc^T u = s u then v = Xc^T u / sqrt(s) is a unit
        # eigenvector of C with eigenvalue s / (n-1).
        s, u = np.linalg.eigh(xc @ xc.T)
        order = np.argsort(s)[::-1]
        s, u = s[order], u[:, order]
        keep = s > max(float(s[0]), 0.0) * RANK_TOL
        s, u = s[keep], u[:, keep]
        vecs = (xc.T @ u) / np.sqrt(s)
        eig = s / (n - 1)
    else:
        eig, vecs = np.linalg.eigh(xc.T @ xc / (n - 1))
        order = np.argsort(eig)[::-1]
        eig, vecs = eig[order], vecs[:, order]
        keep = eig > max(float(eig[0]), 0.0) * RANK_TOL
        eig, vecs = eig[keep], vecs[:, keep]
    rank = int(eig.shape[0])
    if rank == 0:
        raise ValueError(
            f"all {n} descriptors are identical: there is no variance to fit "
            "(the same image repeated?)"
        )
    k = dim or rank
    if k > rank:
        raise ValueError(
            f"--dim {k} is too large: the {n} descriptors vary in only {rank} directions "
            f"(duplicate images?); use --dim {rank} or less, or fit on more varied images"
        )
    components = vecs[:, :k].T
    # A deterministic sign per axis (eigh's is arbitrary): the largest coordinate positive.
    flip = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components = components * flip[:, None]
    eig = eig[:k]
    kept = float(eig.sum()) / total_var
    if shrinkage:
        eig = (1.0 - shrinkage) * eig + shrinkage * total_var / d
    eig = np.maximum(eig, EIGVAL_FLOOR * float(eig[0]))
    return Whitening(
        mean=mean.astype(np.float32),
        components=components.astype(np.float32),
        eigvals=eig.astype(np.float32),
        model=model,
        nodes=tuple(nodes),
        pool=pool,
        n_samples=n,
        variance_kept=kept,
    )


def save(head: Whitening, path: str | Path | IO[bytes]) -> None:
    """Write the head in the server's ``layertap-head-v1`` .npz format (no pickle); a path
    is written as given (no ``.npz`` appended)."""
    h = head
    arrays = HeadArrays(h.mean, h.components, h.eigvals, h.model, h.nodes, h.pool, h.n_samples)
    if isinstance(path, str | Path):
        with open(path, "wb") as f:
            write_head(f, arrays)
    else:
        write_head(path, arrays)


def load(path: str | Path | IO[bytes]) -> Whitening:
    """Read a head file with the server's checks (ValueError says what is wrong)."""
    a = read_head(path)
    return Whitening(a.mean, a.components, a.eigvals, a.model, a.nodes, a.pool, a.n_samples or 0)
