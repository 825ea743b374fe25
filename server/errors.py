"""Domain errors. Stages raise these; the transport maps them to gRPC statuses in one table.

They know nothing of gRPC so the codec, batcher and model runtime stay testable on their own.
The message is shown to the client verbatim: say what was wrong and what to do about it.
"""

from __future__ import annotations

import re


class LayertapError(Exception):
    """Base of every error the client is meant to see."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(LayertapError):
    """A field of the request is malformed or inconsistent (→ INVALID_ARGUMENT)."""


class PerImageError(LayertapError):
    """An error about one image; `at(index)` names the image's position in the request."""

    def __init__(self, reason: str, index: int | None = None) -> None:
        self.reason = reason
        self.index = index
        prefix = f"image {index}: " if index is not None else ""
        super().__init__(prefix + reason)

    def at(self, index: int) -> PerImageError:
        return type(self)(self.reason, index)


class InvalidImage(PerImageError, InvalidArgument):
    """One image cannot be decoded or used (→ INVALID_ARGUMENT)."""


class UnknownNode(InvalidArgument):
    """A requested node is not in the model's graph (→ INVALID_ARGUMENT with suggestions)."""


class ModelNotFound(LayertapError):
    """The model name is not configured on this server (→ NOT_FOUND)."""


class LimitExceeded(LayertapError):
    """A configured limit was hit: images per request, bytes, pixels (→ RESOURCE_EXHAUSTED)."""


class ImageLimitExceeded(PerImageError, LimitExceeded):
    """A per-image limit, bytes or pixels (→ RESOURCE_EXHAUSTED)."""


class QueueFull(LimitExceeded):
    """The batch queue is at its bound; retry later (→ RESOURCE_EXHAUSTED)."""


class Unavailable(LayertapError):
    """The model is loading or failed to load, or the server is shutting down (→ UNAVAILABLE)."""


class Disabled(LayertapError):
    """A method this server's settings turn off (→ UNIMPLEMENTED)."""


class Cancelled(LayertapError):
    """The request was cancelled before it ran (→ CANCELLED)."""


# A filesystem path in a message: absolute (/..., C:\...), home (~/...) or ./ ../ relative,
# not preceded by a word character, a dot or a slash (so URLs, "and/or" and 1/2 stay).
_PATH = re.compile(
    r"(?<![\w.~/\\:-])(?:~|\.{1,2}|[A-Za-z]:)?"  # the start: nothing path-like before it
    r"(?:[/\\][^\s/\\'\"`<>|;,()\[\]{}]+)+[/\\]?"  # one or more /segments
)


def _base_name(path: str) -> str:
    parts = [p for p in re.split(r"[/\\]", path) if p]
    return parts[-1] if parts else path


def without_paths(message: str) -> str:
    """A message for clients: every server filesystem path in it (weights files, cache
    folders) cut to its base name. The server log keeps the whole message."""
    return _PATH.sub(lambda m: _base_name(m.group()), message)
