"""Python SDK for a layertap server: intermediate-layer activations of vision models over gRPC.

Usage::

    from layertap.client import FeatureClient

    with FeatureClient("127.0.0.1:50051") as client:
        out = client.extract(["cat.jpg", "dog.png"], model="resnet50", nodes="layer4", pool="gem")
        print(out["layer4"].shape)  # (2, 2048)

Only grpcio, protobuf and numpy are needed: PIL and torch are imported only when you pass
their objects. :class:`AsyncFeatureClient` offers the same API for asyncio. For a secured
server pass ``token="..."`` and/or ``credentials=tls_credentials(ca="ca.pem")``.

Descriptors: ``pool`` (avg, max, gem, avgmax, catavgmax, rmac, rgem, cls, mean, cls_mean),
``post=["whiten:HEAD:256"]`` with the server's heads (``get_server_info().heads``),
``concat=True`` over several nodes, ``tta="flip"``, ``regions=`` (boxes per image) and
``dtype="int8"`` (np.int8, divide by 127); see ``FeatureClient.extract``.

For thousands of images, ``extract_many(items, ...)`` streams them with bounded memory
(a window of unanswered images), yields ``(id, result)`` in order, and retries transient
failures; ``extract`` splits calls past the server's limits by itself.

For several replicas give a target that resolves to all of them (``dns:///headless-svc:50051``
or ``10.0.0.1:50051,10.0.0.2:50051``): calls are spread round robin and a call that fails
with UNAVAILABLE (or a transient RESOURCE_EXHAUSTED) is retried, with backoff, on another
replica (``load_balancing=``, ``retries=``).
"""

from __future__ import annotations

from ._aio import AsyncFeatureClient
from ._images import ImageLike
from ._options import (
    DEFAULT_LOAD_BALANCING,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RETRIES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
)
from ._responses import bfloat16_to_float32
from ._security import tls_credentials
from ._sync import FeatureClient
from .errors import FeatureServiceError
from .types import (
    ExtractMetadata,
    ExtractResult,
    HeadInfo,
    ModelDescription,
    ModelInfo,
    ModuleInfo,
    NodeInfo,
    Preprocessing,
    ResolvedNode,
    ServerInfo,
    Timings,
)

__all__ = [
    "DEFAULT_LOAD_BALANCING",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_RETRIES",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "AsyncFeatureClient",
    "ExtractMetadata",
    "ExtractResult",
    "FeatureClient",
    "FeatureServiceError",
    "HeadInfo",
    "ImageLike",
    "ModelDescription",
    "ModelInfo",
    "ModuleInfo",
    "NodeInfo",
    "Preprocessing",
    "ResolvedNode",
    "ServerInfo",
    "Timings",
    "bfloat16_to_float32",
    "tls_credentials",
]
