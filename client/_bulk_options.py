"""The arguments of one ``extract_many`` call (either client), validated before anything is
pulled or sent: the request template and how the run goes (batch size, concurrency, order,
progress bar, transport, error mode, retries, timeout).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from layertap.v1 import layertap_pb2 as pb

from ._requests import request_template
from .errors import FeatureServiceError
from .types import ExtractResult

Transport = Literal["stream", "unary"]
ErrorMode = Literal["raise", "yield"]
BulkResult = ExtractResult | FeatureServiceError


@dataclass(frozen=True)
class BulkOptions:
    """Validated arguments of one ``extract_many`` run."""

    template: pb.ExtractRequest
    batch_size: int
    concurrency: int
    ordered: bool
    progress: bool | None
    transport: Transport
    errors: ErrorMode
    retries: int
    timeout: float | None
    client_max_message_bytes: int


_RUN_OPTIONS = ("batch_size", "concurrency", "ordered", "progress", "transport", "errors")
"""The keyword arguments of ``extract_many`` that shape the run rather than the request."""


def check_bulk_args(
    batch_size: int, concurrency: int, transport: str, errors: str, ordered: bool
) -> None:
    """Refuse bad ``extract_many`` arguments before anything is pulled or sent."""
    for name, value in (("batch_size", batch_size), ("concurrency", concurrency)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if transport not in ("stream", "unary"):
        raise ValueError(f"transport must be 'stream' or 'unary', got {transport!r}")
    if errors not in ("raise", "yield"):
        raise ValueError(f"errors must be 'raise' or 'yield', got {errors!r}")
    if not isinstance(ordered, bool):
        raise TypeError(f"ordered must be a bool, got {ordered!r}")


def bulk_options(
    arguments: Mapping[str, Any],
    timeout: float | None,
    retries: int,
    client_max_message_bytes: int,
) -> BulkOptions:
    """Validate the arguments of an ``extract_many`` call of either client (its ``locals()``:
    the request's options, see :func:`request_template`, and the run's) into BulkOptions;
    ``timeout`` is the call's, resolved against the client's default."""
    run = {name: arguments[name] for name in _RUN_OPTIONS}
    check_bulk_args(
        run["batch_size"], run["concurrency"], run["transport"], run["errors"], run["ordered"]
    )
    return BulkOptions(
        template=request_template(arguments),
        **run,
        retries=retries,
        timeout=timeout,
        client_max_message_bytes=client_max_message_bytes,
    )
