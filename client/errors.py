"""The one exception type the SDK raises for anything that went wrong on the wire.

Callers catch a single class instead of grpc's ``RpcError`` (whose ``code()``/``details()``
are methods, and whose concrete subclasses differ between the sync and asyncio stacks).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

RETRYABLE_METADATA_KEY = "layertap-retryable"
"""Trailing metadata the server sets to ``true`` on transient failures (a full queue), so the
client can tell them from limits (too many images, too big), which must never be retried."""

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def _marked_retryable(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    for key, value in metadata or ():
        if key.lower() == RETRYABLE_METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return text.strip().lower() == "true"
    return False


class FeatureServiceError(Exception):
    """A failed call: the server's status code and message, or a malformed response.

    ``code`` is the :class:`grpc.StatusCode` of the failed RPC, or ``None`` when the call
    succeeded but its response broke the protocol (checked by the client, never trusted).
    ``retryable`` says whether the client may try again: UNAVAILABLE, or RESOURCE_EXHAUSTED
    that the server marked transient (a full queue, not a request over a limit).
    """

    def __init__(
        self, code: grpc.StatusCode | None, details: str, *, retryable: bool = False
    ) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details
        self.retryable = retryable

    @property
    def code_name(self) -> str:
        """The status name, e.g. ``"NOT_FOUND"``; ``"INVALID_RESPONSE"`` for protocol errors."""
        return self.code.name if self.code is not None else "INVALID_RESPONSE"

    def __str__(self) -> str:
        return f"{self.code_name}: {self.details}"

    def __reduce__(self) -> tuple[object, ...]:
        # keyword-only ``retryable`` would be lost by Exception's default pickling
        return (_rebuild, (self.code, self.details, self.retryable))

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> FeatureServiceError:
        """Wrap a sync or asyncio ``RpcError``; both expose ``code()``, ``details()`` and
        ``trailing_metadata()`` (read for the server's retryable mark)."""
        code_fn = getattr(error, "code", None)
        details_fn = getattr(error, "details", None)
        code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
        details = details_fn() if callable(details_fn) else None
        retryable = code == grpc.StatusCode.UNAVAILABLE
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            trailing_fn = getattr(error, "trailing_metadata", None)
            try:
                trailing = trailing_fn() if callable(trailing_fn) else None
            except Exception:  # a half-built error object; treat as unmarked
                trailing = None
            retryable = _marked_retryable(trailing)
        return cls(code, details or str(error) or "no details", retryable=retryable)

    @classmethod
    def from_item_error(cls, code: int, code_name: str, message: str) -> FeatureServiceError:
        """One ExtractStream item's error. Items carry no metadata, so a RESOURCE_EXHAUSTED item
        counts as transient when the server's message says to retry (a full queue)."""
        status = _CODES_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
        retryable = status == grpc.StatusCode.UNAVAILABLE or (
            status == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in message.lower()
        )
        return cls(status, message or code_name or "no details", retryable=retryable)

    @classmethod
    def invalid_response(cls, details: str) -> FeatureServiceError:
        """A response that does not follow the protocol (wrong lengths, missing outputs...)."""
        return cls(None, f"malformed server response: {details}")


def _rebuild(code: grpc.StatusCode | None, details: str, retryable: bool) -> FeatureServiceError:
    return FeatureServiceError(code, details, retryable=retryable)
