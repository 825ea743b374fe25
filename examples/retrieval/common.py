"""What index.py and query.py share: the descriptor request, the index file, the search.

The descriptor options are stored in the index, so a query is described exactly like the
indexed images were (same model, node, pooling, post-processing); cosine similarity is then
a dot product of L2-normalised vectors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layertap.client import FeatureClient, FeatureServiceError

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
INDEX_FORMAT = "layertap-retrieval-index-v1"


def default_target() -> str:
    return os.environ.get("LAYERTAP_TARGET", "127.0.0.1:50051")


def find_images(root: Path, recursive: bool) -> list[Path]:
    """Image files under ``root`` (hidden files skipped), sorted for a stable index order."""
    pattern = root.rglob("*") if recursive else root.glob("*")
    return sorted(
        p
        for p in pattern
        if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")
    )


@dataclass(frozen=True)
class Descriptor:
    """How a descriptor is requested: what the index stores and a query must repeat."""

    model: str = "mobilenet_v2"
    node: str = "features"
    pool: str = "gem"
    gem_p: float = 3.0
    post: tuple[str, ...] = ()  # e.g. ("l2", "whiten:HEAD") for a head registered on the server

    def request(self) -> dict[str, Any]:
        """Keyword arguments of FeatureClient.extract / extract_many."""
        options: dict[str, Any] = {
            "model": self.model,
            "nodes": {self.node: "vector"},
            "pool": self.pool,
            "gem_p": self.gem_p,
            "normalize": True,  # cosine similarity = dot product
        }
        if self.post:
            options["post"] = list(self.post)
        return options


def describe(
    client: FeatureClient, items: Iterable[tuple[str, Any]], desc: Descriptor
) -> Iterator[tuple[str, np.ndarray | FeatureServiceError]]:
    """(id, vector) per image, in order; an image the server refuses gives its error."""
    for image_id, result in client.extract_many(
        items, **desc.request(), errors="yield", ordered=True
    ):
        if isinstance(result, FeatureServiceError):
            yield image_id, result
        else:
            yield image_id, np.asarray(result["vector"][0], dtype=np.float32)


@dataclass
class Index:
    """L2-normalised vectors [N, D] and their ids, plus how they were described."""

    ids: list[str]
    vectors: np.ndarray
    desc: Descriptor
    _faiss: Any = field(default=None, repr=False)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            format=np.asarray(INDEX_FORMAT),
            ids=np.asarray(self.ids, dtype=np.str_),
            vectors=self.vectors.astype(np.float32),
            model=np.asarray(self.desc.model),
            node=np.asarray(self.desc.node),
            pool=np.asarray(self.desc.pool),
            gem_p=np.asarray(self.desc.gem_p),
            post=np.asarray(list(self.desc.post), dtype=np.str_).reshape(-1),
        )

    @classmethod
    def load(cls, path: Path) -> Index:
        with np.load(path, allow_pickle=False) as npz:
            if "format" not in npz.files or str(npz["format"]) != INDEX_FORMAT:
                raise ValueError(f"{path} is not an index written by index.py")
            desc = Descriptor(
                model=str(npz["model"]),
                node=str(npz["node"]),
                pool=str(npz["pool"]),
                gem_p=float(npz["gem_p"]),
                post=tuple(str(s) for s in npz["post"]),
            )
            return cls([str(i) for i in npz["ids"]], npz["vectors"], desc)

    def search(self, queries: np.ndarray, k: int, backend: str = "auto") -> tuple[Any, Any]:
        """Top-k (scores [Q, k], positions [Q, k]) by cosine similarity, best first.

        ``backend`` "faiss" uses an exact inner-product FAISS index (when faiss is
        installed); "numpy" a matrix product; "auto" FAISS if importable, else numpy.
        """
        k = min(k, len(self.ids))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if backend in ("auto", "faiss"):
            try:
                import faiss  # type: ignore[import-not-found]
            except ImportError:
                if backend == "faiss":
                    raise SystemExit("--backend faiss: faiss is not installed") from None
            else:
                if self._faiss is None:
                    self._faiss = faiss.IndexFlatIP(self.vectors.shape[1])
                    self._faiss.add(np.ascontiguousarray(self.vectors, dtype=np.float32))
                return self._faiss.search(q, k)
        scores = q @ self.vectors.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), order
