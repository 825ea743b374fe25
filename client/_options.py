"""Settings shared by the sync and async clients: channel options and per-call deadlines."""

from __future__ import annotations

import enum
from collections.abc import Sequence

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""64 MiB each way: gRPC's own 4 MiB receive default is too small for raw activations."""


class _Unset(enum.Enum):
    """Sentinel type: "use the client's default timeout", distinct from ``None`` (no deadline)."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "<client default>"


UNSET = _Unset.UNSET
Timeout = float | None | _Unset
"""Per-call timeout in seconds; ``None`` waits forever; unset uses the client's default."""


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Explicit send/receive limits so large batches fail loudly only past the chosen size."""
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int):
        raise TypeError(f"max_message_bytes must be an int, got {max_message_bytes!r}")
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    """A deadline in seconds must be positive; ``None`` means no deadline."""
    if timeout is None:
        return None
    value = float(timeout)
    if not value > 0:
        raise ValueError(f"{what} must be a positive number of seconds or None, got {timeout!r}")
    return value


def resolve_timeout(timeout: Timeout, default: float | None) -> float | None:
    """The per-call timeout if given, else the client's default."""
    return default if timeout is UNSET else check_timeout(timeout)


def call_metadata(metadata: Sequence[tuple[str, str]] | None) -> tuple[tuple[str, str], ...] | None:
    """Freeze user metadata once; gRPC wants lowercase keys, so say so early."""
    if metadata is None:
        return None
    frozen = tuple((str(k), str(v)) for k, v in metadata)
    for key, _ in frozen:
        if key != key.lower():
            raise ValueError(f"gRPC metadata keys must be lowercase, got {key!r}")
    return frozen
