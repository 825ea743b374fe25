"""A bulk run's progress and its summary: a tqdm bar on a terminal (images/s, the ETA once the
total is counted, failures), a background count of the images still to do (discovery
streams, so the total is not known when the run starts), and the summary printed at the end
and written by ``--summary-json``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .._bulk import progress_bar
from .idsets import DoneIds, chunks, id_hashes
from .stores import atomic_write

MAX_LISTED = 10_000
"""Failures and skip notes kept for the summary (memory stays bounded); the rest are counted."""


@dataclass
class Summary:
    """What a run did; :meth:`as_json` is the ``--summary-json`` document."""

    output: str
    started: float = field(default_factory=time.monotonic)
    added: int = 0
    already: int = 0
    failed: int = 0
    skipped: int = 0
    rows: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    skip_notes: list[str] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def fail(self, image_id: str, where: str, reason: str) -> None:
        """(from the main thread, or the one reading the input)"""
        with self._lock:
            self.failed += 1
            if len(self.failures) < MAX_LISTED:
                self.failures.append({"id": image_id, "path": where, "reason": reason})

    def skip(self, note: str) -> None:
        self.skipped += 1
        if len(self.skip_notes) < MAX_LISTED:
            self.skip_notes.append(note)

    def stop(self, rows: int) -> None:
        self.rows = rows
        self.seconds = time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "finished": self.finished,
            "error": self.error,
            "added": self.added,
            "already_present": self.already,
            "failed": self.failed,
            "failures": self.failures,
            "failures_not_listed": self.failed - len(self.failures),
            "skipped": self.skipped,
            "skipped_notes": self.skip_notes,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.rate, 3),
        }

    def write_json(self, path: Path) -> None:
        text = json.dumps(self.as_json(), indent=1, ensure_ascii=False) + "\n"
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))

    def print(self, out: IO[str]) -> None:
        print(
            f"{self.added} new image(s) extracted, {self.already} already in {self.output}, "
            f"{self.failed} failed; {self.rows} row(s) in {self.output}",
            file=out,
        )
        print(f"{self.seconds:.1f} s, {self.rate:.1f} images/s", file=out)
        if self.failed:
            print(f"{self.failed} image(s) failed (not written; rerun to retry them):", file=out)
            for failure in self.failures:
                print(f"  {failure['path']}: {failure['reason']}", file=out)
            if self.failed > len(self.failures):
                print(f"  ... and {self.failed - len(self.failures)} more", file=out)


class Progress:
    """The run's bar (None off a terminal or with --no-progress) and its messages, safe to
    call from the threads that read the input."""

    def __init__(self, enabled: bool) -> None:
        self.bar = progress_bar(None if enabled else False, None, desc=None)
        self._lock = threading.Lock()
        self._failed = 0
        self._total: int | None = None
        self._stop = threading.Event()
        self._counter: threading.Thread | None = None

    def message(self, text: str) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr)

    def advance(self, failed: bool = False) -> None:
        """One image done (``failed``: not written)."""
        bar = self.bar
        if bar is None:
            return
        with self._lock:
            if self._total is not None and bar.total != self._total:
                bar.total = max(self._total, bar.n + 1)
            if failed:
                self._failed += 1
                bar.set_postfix_str(f"failed={self._failed}", refresh=False)
            bar.update(1)

    def count_in_background(self, images: Callable[[], Iterable[Any]], done: DoneIds) -> None:
        """Count the images still to do on a daemon thread (another pass over discovery,
        without reading any image); the bar gets its total, hence an ETA, when it is known."""
        if self.bar is None:
            return

        def count() -> None:
            todo = 0
            try:
                for chunk in chunks(images()):
                    if self._stop.is_set():
                        return
                    todo += len(chunk) - int(done.contains(id_hashes([i.id for i in chunk])).sum())
            except Exception:  # the run meets the same problem and reports it
                return
            self._total = todo

        self._counter = threading.Thread(target=count, name="layertap-count", daemon=True)
        self._counter.start()

    def close(self, complete: bool) -> None:
        """Stop the count; a complete run's bar ends at its count (duplicates and skipped
        entries made the estimate larger)."""
        self._stop.set()
        if self.bar is None:
            return
        with self._lock:
            if complete:
                self.bar.total = self.bar.n
                self.bar.refresh()
            self.bar.close()
