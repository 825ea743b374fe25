"""Plain-Python mirrors of the protocol's messages, as the SDK returns them.

Protobuf objects stay behind the SDK boundary so user code does not depend on the generated
stubs (repeated-field containers, default-valued submessages) and results pickle and
compare like ordinary values.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """How the server turns pixels into the model's input tensor."""

    resize_size: int
    """Shorter side is resized to this many pixels before the crop (0: no resize)."""
    crop_size: tuple[int, ...]
    """Centre crop (height, width)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    antialias: bool
    resize_kernel: str = ""
    """"uint8" (torchvision v2's native kernel) or "float" (weights.transforms() on tensors);
    empty from servers that predate the choice."""
    resize_mode: str = "shorter"
    """"shorter" (the shorter side becomes resize_size) or "squash" (resize_size scaled to the
    crop's shape, aspect not kept)."""
    crop_offset: str = "round"
    """Where an odd-margin centre crop starts: "round" (torchvision) or "floor" (Hugging Face)."""


@dataclass(frozen=True)
class ModelInfo:
    """A model the server is configured with."""

    name: str
    architecture: str
    weights: str
    weights_sha256: str
    input_size: tuple[int, ...]
    """(height, width)."""
    preprocessing: Preprocessing
    device: str
    ready: bool
    status_message: str
    """Why the model is not ready; empty when it is."""
    random_weights: bool
    compute_dtype: str
    prefix_tokens: int = 0
    """Leading non-patch tokens (CLS, registers) of the model's NLC outputs."""
    extraction_mode: str = ""
    """"fx" (graph nodes) or "hooks" (module outputs only); "" from an older server."""
    source: str = ""
    """"torchvision", "factory", "timm", "huggingface" or "export"; "" from an older server."""


@dataclass(frozen=True)
class HeadInfo:
    """A post-processing head (centering / PCA / whitening) registered in the server config,
    usable as ``post=["whiten:NAME"]`` on descriptors of ``input_dim`` values."""

    name: str
    model: str
    """The model it was fitted for ("" when any model may use it)."""
    input_dim: int
    """Descriptor dimension it takes."""
    components: int
    """Components it holds: the largest ``dim`` a "pca"/"whiten" step may ask for."""
    nodes: tuple[str, ...] = ()
    """What it was fitted on (informative)."""
    pool: str = ""


@dataclass(frozen=True)
class ServerInfo:
    """The server's version, the limits it enforces and what it supports, so callers (and the
    SDK's automatic chunking) can size and shape requests. A limit of 0 means "not reported"
    (an older server answering through ListModels); capability lists are then empty."""

    version: str
    max_images_per_request: int
    max_image_bytes: int
    max_image_pixels: int
    max_message_bytes: int
    max_batch_size: int
    max_queue_images: int
    max_stream_in_flight: int = 0
    """Unanswered ExtractStream items the server holds per stream."""
    max_parameter_bytes: int = 0
    """Largest GetParameters answer (sum of tensor bytes)."""
    image_formats: tuple[str, ...] = ()
    input_dtypes: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()
    """Pooling enum names the server accepts, e.g. "POOLING_GEM"."""
    output_dtypes: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    """RPC names the server implements (empty: unknown, an older server)."""
    heads: tuple[HeadInfo, ...] = ()
    """Post-processing heads for ``post=`` steps "center"/"pca"/"whiten"."""


@dataclass(frozen=True)
class NodeInfo:
    """One node of a model's eval graph."""

    name: str
    """Full node name, usable in ``extract(nodes=...)``."""
    shape: tuple[int, ...]
    """Shape for one image at the model's input size (leading dimension 1)."""
    dtype: str
    layout: str
    """"NCHW", "NHWC", "NLC", "NC" or "" (unknown)."""
    op: str
    target: str


@dataclass(frozen=True)
class ModuleInfo:
    """One module of the model (depth first); ``name`` "" is the root."""

    name: str
    type: str
    own_parameters: int


@dataclass(frozen=True)
class ModelDescription:
    """What ``describe()`` returns: the model and its extractable nodes."""

    model: ModelInfo
    nodes: list[NodeInfo]
    modules: list[ModuleInfo]
    extraction_mode: str
    extraction_reason: str = ""
    """Why this mode: configured, or the trace error that made the server fall back to hooks."""

    @property
    def node_names(self) -> list[str]:
        """The node names in execution order."""
        return [n.name for n in self.nodes]


class ResolvedNode(NamedTuple):
    """How one requested name was resolved: output key, name as requested, full node name."""

    key: str
    requested: str
    node: str


@dataclass(frozen=True)
class Timings:
    """Server-side timings of one Extract call, in milliseconds."""

    queue_ms: float
    decode_ms: float
    compute_ms: float
    total_ms: float


@dataclass(frozen=True)
class ExtractMetadata:
    """What the server ran for an Extract call (for provenance and debugging)."""

    model: str
    weights_sha256: str
    device: str
    batch_size: int
    """Largest batch (in images) any image of the request rode in."""
    nodes: list[ResolvedNode]
    preprocessing: Preprocessing
    timings: Timings


Output: TypeAlias = np.ndarray | list[np.ndarray]
"""One output of all images: stacked [N, ...], or a list of N per-image arrays (ragged)."""


class ExtractResult(Mapping[str, Output]):
    """Output key -> activations of all images stacked along a new first axis ([N, ...]).

    Keys are in request order. Arrays are writable float32/float16 (bfloat16 outputs are
    widened to float32, which is exact) or int8 for ``dtype="int8"`` descriptors
    (``round(127 x)`` of an L2-normalised x: divide by 127 to get back [-1, 1]).

    ``per_image[i][key]`` is image ``i``'s array without the batch axis; when all images
    share a shape it is a view into the stacked one. When they do not (region outputs with a
    different number of boxes R per image, each image's output being [R, ...]; raw maps at
    ``native_resolution`` of differently sized images), ``result[key]`` is a **list** of the N
    per-image arrays instead of one array: ``for feats in result[key]`` and
    ``result[key][i]`` work either way. :meth:`array` always gives one array (ValueError when
    ragged), :meth:`arrays` always a list.
    """

    def __init__(
        self,
        stacked: Mapping[str, np.ndarray | None],
        per_image: Sequence[dict[str, np.ndarray]],
        layouts: Mapping[str, str],
        nodes: Mapping[str, str],
        metadata: ExtractMetadata,
    ) -> None:
        self._stacked = dict(stacked)
        self.per_image: list[dict[str, np.ndarray]] = list(per_image)
        self.layouts: dict[str, str] = dict(layouts)
        """Output key -> layout of its node ("NCHW", "NLC", ... or "")."""
        self.nodes: dict[str, str] = dict(nodes)
        """Output key -> the full node name it resolved to."""
        self.metadata = metadata

    def __getitem__(self, key: str) -> np.ndarray | list[np.ndarray]:
        array = self._stacked[key]
        if array is None:
            return self.arrays(key)
        return array

    def is_ragged(self, key: str) -> bool:
        """True when ``key``'s per-image shapes differ, so ``result[key]`` is a list."""
        return self._stacked[key] is None

    def array(self, key: str) -> np.ndarray:
        """``key`` stacked as [N, ...]; ValueError when the images' shapes differ."""
        array = self._stacked[key]
        if array is None:
            shapes = sorted({tuple(img[key].shape) for img in self.per_image})
            raise ValueError(
                f"output {key!r} has different shapes per image {shapes} and cannot be "
                "stacked; use result.arrays(key) or result.per_image[i][key]"
            )
        return array

    def arrays(self, key: str) -> list[np.ndarray]:
        """``key`` as a list of the N per-image arrays (views when stacked)."""
        if key not in self._stacked:
            raise KeyError(key)
        return [image[key] for image in self.per_image]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stacked)

    def __len__(self) -> int:
        return len(self._stacked)

    def __repr__(self) -> str:
        parts = []
        for key, array in self._stacked.items():
            desc = f"{list(array.shape)} {array.dtype}" if array is not None else "list (ragged)"
            parts.append(f"{key!r}: {desc}")
        return f"ExtractResult({{{', '.join(parts)}}}, model={self.metadata.model!r})"


__all__ = [
    "ExtractMetadata",
    "ExtractResult",
    "HeadInfo",
    "ModelDescription",
    "ModelInfo",
    "ModuleInfo",
    "NodeInfo",
    "Preprocessing",
    "ResolvedNode",
    "ServerInfo",
    "Timings",
]
