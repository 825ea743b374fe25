"""Compare calls of both clients: pairs in, per-pair perceptual distances out.

Plain functions (request building, chunking, parsing) shared by FeatureClient.compare and
AsyncFeatureClient.compare, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from layertap.v1 import layertap_pb2 as pb

from ._images import ImageLike, as_image_list, images_to_proto
from ._requests import images_per_request
from .types import ResolvedNode, ServerInfo


@dataclass(frozen=True)
class PairDistance:
    """One pair's distances; ``layers``/``style_layers``: output key (node) -> term."""

    distance: float
    """Sum of ``layers``: LPIPS-style (channels unit-normalised per position, squared
    difference summed over channels, mean over positions), without learned weights."""
    layers: dict[str, float]
    style_distance: float
    """Sum of ``style_layers`` (0 unless ``style=True``)."""
    style_layers: dict[str, float]
    """Per node ||G(a) - G(b)||_F^2, G = F Fᵀ/(C·H·W); empty unless ``style=True``."""


@dataclass(frozen=True)
class CompareResult:
    """What :meth:`FeatureClient.compare` returns: one PairDistance per pair, in order."""

    model: str
    weights_sha256: str
    nodes: list[ResolvedNode]
    pairs: list[PairDistance]

    @property
    def distances(self) -> np.ndarray:
        """float32 [N]: each pair's total distance."""
        return np.array([p.distance for p in self.pairs], dtype=np.float32)

    @property
    def style_distances(self) -> np.ndarray:
        """float32 [N]: each pair's total style distance."""
        return np.array([p.style_distance for p in self.pairs], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.pairs)


def _as_nodes(nodes: str | Sequence[str] | None) -> list[str]:
    if nodes is None:
        return []
    if isinstance(nodes, str):
        return [nodes]
    names = list(nodes)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"nodes must be non-empty strings, got {name!r}")
    return names


def build_compare_requests(
    a: ImageLike | Sequence[ImageLike],
    b: ImageLike | Sequence[ImageLike],
    *,
    model: str,
    nodes: str | Sequence[str] | None,
    style: bool,
    native_resolution: bool,
    info: ServerInfo | None,
) -> list[pb.CompareRequest]:
    """The pairs as CompareRequests, split so none carries more images (both sides count)
    than the server's max_images_per_request (from ``info``, when known)."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string")
    images_a, images_b = images_to_proto(a), images_to_proto(b)
    if len(images_a) != len(images_b):
        raise ValueError(
            f"a has {len(images_a)} images and b has {len(images_b)}; pass lists of the same "
            "length (pairs a[i], b[i])"
        )
    if not images_a:
        raise ValueError("no pairs: pass at least one image in a and in b")
    template = pb.CompareRequest(
        model=model, nodes=_as_nodes(nodes), style=style, native_resolution=native_resolution
    )
    per_call = max(1, images_per_request(info) // 2)
    requests = []
    for start in range(0, len(images_a), per_call):
        request = pb.CompareRequest()
        request.CopyFrom(template)
        request.a.extend(images_a[start : start + per_call])
        request.b.extend(images_b[start : start + per_call])
        requests.append(request)
    return requests


COMPARE_ARGUMENTS = ("a", "b", "model", "nodes", "style", "native_resolution")
"""The arguments of ``compare`` (both clients) that go into the requests."""


def compare_requests(
    arguments: Mapping[str, Any], info: ServerInfo | None
) -> list[pb.CompareRequest]:
    """The requests of a ``compare`` call of either client, from that call's arguments (its
    ``locals()``, of which the :data:`COMPARE_ARGUMENTS` are read); see
    :func:`build_compare_requests`."""
    return build_compare_requests(
        **{name: arguments[name] for name in COMPARE_ARGUMENTS}, info=info
    )


def parse_compare_responses(responses: Sequence[pb.CompareResponse]) -> CompareResult:
    """Per-call answers (in order) → one CompareResult."""
    first = responses[0]
    nodes = [ResolvedNode(n.key, n.requested, n.node) for n in first.nodes]
    keys = [n.key for n in nodes]
    pairs = []
    for response in responses:
        for p in response.pairs:
            style = dict(zip(keys, map(float, p.style_layer_distances), strict=False))
            pairs.append(
                PairDistance(
                    distance=float(p.distance),
                    layers=dict(zip(keys, map(float, p.layer_distances), strict=True)),
                    style_distance=float(p.style_distance),
                    style_layers=style,
                )
            )
    return CompareResult(first.model, first.weights_sha256, nodes, pairs)


def several_pairs(a: ImageLike | Sequence[ImageLike]) -> bool:
    """More than one pair: the call may need splitting, so the server's limits are read."""
    return len(as_image_list(a)) > 1
