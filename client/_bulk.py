"""The bulk-extraction engine behind ``extract_many`` of both clients (asyncio; the blocking
client drives it on a private event loop).

Memory stays bounded on both sides whatever the input's length:

- at most ``window`` items are sent and unanswered: for ExtractStream
  ``min(concurrency * batch_size, server's max_stream_in_flight)`` single-image items; for
  unary Extract ``concurrency`` calls of up to ``batch_size`` images;
- the input is pulled lazily, and at most ``2 * window`` items are held between being pulled
  and being handed to the caller (the in-flight ones, finished ones waiting for their turn when
  ``ordered``, and ones waiting for a retry).

Each image is one stream item, so one bad image fails only itself; the server batches items
of all streams and calls together. Unary calls are sized to the server's advertised limits
(images per request, message bytes); a call refused for one image's sake (INVALID_ARGUMENT,
or a RESOURCE_EXHAUSTED that is not transient) is split and its images resent one by one, so
the error lands on the image that caused it.

Here: :class:`BulkRun` (results handed out with the progress bar, the choice of transport);
the arguments in ``_bulk_options``, the run's queues and input in ``_bulk_state``, the stream
and unary transports in ``_bulk_transports``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncGenerator
from typing import Any

from ._bulk_options import BulkResult
from ._bulk_transports import FallBackToUnary, StreamTransport, UnaryTransport
from .errors import FeatureServiceError


def progress_bar(enabled: bool | None, total: int | None, desc: str | None = "extract") -> Any:
    """A tqdm bar on stderr, or ``None``: ``None`` for ``enabled`` shows it only when stderr is
    a terminal, and then not at all if tqdm cannot be imported (the bar is a nicety); ``True``
    needs tqdm. The one progress bar of the client (``extract_many``, ``layertap extract``)."""
    auto = enabled is None
    if enabled is None:
        isatty = getattr(sys.stderr, "isatty", None)
        enabled = bool(isatty and isatty())
    if not enabled:
        return None
    try:
        from tqdm import tqdm  # imported only when a bar is shown
    except ImportError:
        if auto:
            return None
        raise
    return tqdm(total=total, unit="img", file=sys.stderr, desc=desc, dynamic_ncols=True)


class BulkRun(StreamTransport, UnaryTransport):
    """One ``extract_many`` run over an asyncio stub; iterate :meth:`results` once."""

    async def results(self) -> AsyncGenerator[tuple[Any, BulkResult], None]:
        """``(id, ExtractResult | FeatureServiceError)`` per image, ordered or as completed."""
        bar = progress_bar(self._opt.progress, self._total)
        pump = asyncio.create_task(self._pump())
        pump.add_done_callback(lambda _: self._out.set())
        try:
            while True:
                entry = self._take_done()
                if entry is None:
                    if pump.done():
                        pump.result()  # raises the run's failure; else every item is done
                        return
                    self._out.clear()
                    await self._out.wait()
                    continue
                self._held -= 1
                self._wake.set()
                if bar is not None:
                    bar.update(1)
                assert entry.result is not None
                if isinstance(entry.result, FeatureServiceError) and self._opt.errors == "raise":
                    raise entry.result
                yield entry.id, entry.result
        finally:
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            if bar is not None:
                bar.close()

    # ------------------------------------------------------------------ pump

    async def _pump(self) -> None:
        if self._transport == "stream":
            try:
                await self._pump_stream()
                return
            except FallBackToUnary:
                self._transport = "unary"
        await self._pump_unary()
