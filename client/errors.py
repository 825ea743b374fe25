"""The one exception type the SDK raises for anything that went wrong on the wire.

Callers catch a single class instead of grpc's ``RpcError`` (whose ``code()``/``details()``
are methods, and whose concrete subclasses differ between the sync and asyncio stacks).
"""

from __future__ import annotations

import grpc


class FeatureServiceError(Exception):
    """A failed call: the server's status code and message, or a malformed response.

    ``code`` is the :class:`grpc.StatusCode` of the failed RPC, or ``None`` when the call
    succeeded but its response broke the protocol (checked by the client, never trusted).
    """

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details

    @property
    def code_name(self) -> str:
        """The status name, e.g. ``"NOT_FOUND"``; ``"INVALID_RESPONSE"`` for protocol errors."""
        return self.code.name if self.code is not None else "INVALID_RESPONSE"

    def __str__(self) -> str:
        return f"{self.code_name}: {self.details}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> FeatureServiceError:
        """Wrap a sync or asyncio ``RpcError``; both expose ``code()`` and ``details()``."""
        code_fn = getattr(error, "code", None)
        details_fn = getattr(error, "details", None)
        code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
        details = details_fn() if callable(details_fn) else None
        return cls(code, details or str(error) or "no details")

    @classmethod
    def invalid_response(cls, details: str) -> FeatureServiceError:
        """A response that does not follow the protocol (wrong lengths, missing outputs...)."""
        return cls(None, f"malformed server response: {details}")
