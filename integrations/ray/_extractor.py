"""``Extractor``: the callable class ``Dataset.map_batches`` runs in each actor of its pool, one
:class:`~layertap.client.FeatureClient` per actor, each batch sent with ``extract_many``."""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import numpy as np

from layertap.client import (
    DEFAULT_LOAD_BALANCING,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    ExtractResult,
    FeatureClient,
    FeatureServiceError,
    tls_credentials,
)
from layertap.client._requests import build_request_template
from layertap.common.option_parsing import NodesArg
from layertap.common.options import OUTPUT_OPTION_NAMES, REQUEST_OPTION_NAMES

from ._batches import Batch, image_column, outputs_table, row_images, with_columns

ErrorPolicy = Literal["raise", "null"]
Template = dict[str, tuple[tuple[int, ...], np.dtype[Any]]]

EXTRA_OPTIONS = frozenset(OUTPUT_OPTION_NAMES + REQUEST_OPTION_NAMES) - {
    "pool",
    "normalize",
    "priority",
    "roi_size",  # regions are not read from a column: use FeatureClient for boxes
}
"""The extract options taken as ``**options`` (those of ``FeatureClient.extract``): gem_p,
dtype, post, concat, concat_key, tta, rmac_levels, native_resolution, bypass_result_cache."""

PER_CALL = 8
"""Images per unary call when the stream is not available (window / PER_CALL calls at once)."""
BLANK = np.full((64, 64, 3), 128, np.uint8)
"""The image whose outputs give the shapes of a batch in which every image failed."""


def fleet_target(target: str | Sequence[str]) -> str:
    """The client target for ``target``: one address (``host:port``, ``dns:///name:port``,
    ``ipv4:...``, ``unix:path``) as is; several (a list, or a comma-separated string) become one
    comma-separated list of IP addresses with ports, each host name resolved now to its IPv4
    addresses, which the client balances round robin (``FeatureClient``'s address list)."""
    if isinstance(target, str):
        if "," not in target or "://" in target or target.startswith(("ipv4:", "ipv6:", "unix")):
            return target
        parts: list[Any] = target.split(",")
    elif isinstance(target, Sequence) and not isinstance(target, (bytes, bytearray)):
        parts = list(target)
    else:
        raise TypeError(f"target must be a str or a list of str, got {type(target).__name__}")
    if not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        raise ValueError(f"target must list one or more host:port addresses, got {target!r}")
    parts = [p.strip() for p in parts]
    if len(parts) == 1:
        return parts[0]
    addresses: list[str] = []
    for part in parts:
        for address in _addresses(part):
            if address not in addresses:
                addresses.append(address)
    return ",".join(addresses)


def _addresses(part: str) -> list[str]:
    host, sep, port = part.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"cannot use {part!r} in a list of targets: each is host:port")
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
        return [part]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(
            f"cannot resolve {host!r} (from the target list) to an IPv4 address: {exc}; give IP "
            "addresses, or one dns:///name:port that resolves to every replica"
        ) from exc
    return list(dict.fromkeys(f"{info[4][0]}:{port}" for info in infos))


class Extractor:
    """Adds layertap features to Ray Data batches: ``ds.map_batches(Extractor, ...)``.

    Ray builds one instance per actor of the pool (``fn_constructor_kwargs`` are these
    arguments) and calls it with each batch; see :mod:`layertap.ray` for the whole story.

    - ``target``: the server, ``"host:port"``, ``"dns:///name:port"`` (every address the name
      resolves to), or the fleet's addresses as a list or comma-separated string
      (``["10.0.0.1:50051", "10.0.0.2:50051"]``; host names are resolved once, when the actor
      starts). Streams are spread round robin over the replicas, and an image whose replica
      fails (UNAVAILABLE, a full queue) is resent, with backoff, on another (``retries``).
    - ``model``, ``nodes``, ``pool``, ``normalize`` and ``**options`` (gem_p, dtype, post,
      concat, concat_key, tta, rmac_levels, native_resolution, bypass_result_cache): as in
      ``FeatureClient.extract``; checked here, so a bad option fails the actor at start.
      ``priority`` defaults to "low": a bulk job yields to interactive callers.
    - ``column``: the column holding the images (default: the first of ``image``, ``bytes``,
      ``path`` present): encoded bytes, a decoded uint8 [H, W, 3] (or [H, W]) array, or a file
      path the actor can read.
    - ``errors``: ``"raise"`` (default): the first failed image (in row order) raises its
      ``FeatureServiceError``, its details prefixed with the row (the batch fails; Ray retries
      or fails the job per its own settings); ``"null"``: a failed image's outputs are NaN (0
      for int8 outputs) and the ``error_column`` (default ``error``, always added in this mode)
      says why (``"INVALID_ARGUMENT: ..."``; ``""`` for the rows that succeeded).
    - ``drop_input``: leave the image column out of the output batch.
    - ``window``: the most images of one actor sent and not yet answered (the stream's window;
      capped by the server's ``max_stream_in_flight``); ``transport="unary"`` (for proxies
      without streaming) sends calls of up to 8 images, ``window / 8`` at a time.
    - ``timeout`` (per image, retries included), ``retries``, ``token``, ``load_balancing``:
      as for ``FeatureClient``; ``tls``: keyword arguments of ``tls_credentials``
      (``{"ca": "ca.pem"}``: files read in the actor, since credentials do not pickle).
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        model: str,
        nodes: NodesArg,
        pool: str | None = None,
        normalize: bool = False,
        column: str | None = None,
        errors: ErrorPolicy = "raise",
        error_column: str = "error",
        drop_input: bool = False,
        window: int = 32,
        transport: Literal["stream", "unary"] = "stream",
        priority: str = "low",
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        token: str | None = None,
        tls: Mapping[str, str] | None = None,
        load_balancing: str | None = DEFAULT_LOAD_BALANCING,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - EXTRA_OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown options {unknown}; the extract options are {sorted(EXTRA_OPTIONS)}"
            )
        if errors not in ("raise", "null"):
            raise ValueError(f"errors must be 'raise' or 'null', got {errors!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if transport not in ("stream", "unary"):
            raise ValueError(f"transport must be 'stream' or 'unary', got {transport!r}")
        if column is not None and not isinstance(column, str):
            raise TypeError(f"column must be a column name, got {column!r}")
        self.options: dict[str, Any] = dict(
            model=model, nodes=nodes, pool=pool, normalize=normalize, priority=priority, **options
        )
        build_request_template(**self.options)  # every option checked before anything is sent
        self.column = column
        self.errors = errors
        self.error_column = error_column
        self.drop_input = drop_input
        self.transport = transport
        per_call = min(window, PER_CALL)
        self._run = dict(
            batch_size=per_call, concurrency=math.ceil(window / per_call), transport=transport
        )
        self.target = fleet_target(target)
        credentials = tls_credentials(**tls) if tls is not None else None
        self.client = FeatureClient(
            self.target,
            timeout=timeout,
            retries=retries,
            token=token,
            credentials=credentials,
            load_balancing=load_balancing,
        )
        self._template: Template | None = None

    def __call__(self, batch: Batch) -> Batch:
        """The batch with one column per output key (and ``error_column`` with
        ``errors="null"``), rows in the batch's order."""
        column = image_column(batch, self.column)
        images = row_images(batch, column)
        results = self._extract(images)
        rows: list[dict[str, np.ndarray] | None] = []
        messages: list[str] = []
        for index, result in enumerate(results):
            if isinstance(result, FeatureServiceError):
                if self.errors == "raise":
                    where = f"row {index} of a batch of {len(images)}: {result.details}"
                    raise FeatureServiceError(
                        result.code, where, retryable=result.retryable
                    ) from result
                rows.append(None)
                messages.append(str(result))
            else:
                rows.append(result.per_image[0])
                messages.append("")
        ok = next((row for row in rows if row is not None), None)
        if ok is not None and self._template is None:
            self._template = {key: (a.shape, a.dtype) for key, a in ok.items()}
        if ok is None and rows:
            self._template = self._template or self._probe()
        columns = outputs_table(rows, self._template)
        if self.errors == "null":
            columns[self.error_column] = np.array(messages, dtype=str)
        return with_columns(batch, columns, [column] if self.drop_input else [])

    def _extract(self, images: list[Any]) -> list[ExtractResult | FeatureServiceError]:
        """Every image's result, by row: one extract_many run (stream by default), each image
        answered exactly once (checked)."""
        results: list[ExtractResult | FeatureServiceError | None] = [None] * len(images)
        if not images:
            return []
        answers = self.client.extract_many(
            list(enumerate(images)),
            **self.options,
            **self._run,
            ordered=False,
            errors="yield",
            progress=False,
        )
        for index, result in answers:
            if results[index] is not None:
                raise RuntimeError(f"layertap.ray: row {index} was answered twice")
            results[index] = result
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"layertap.ray: rows {missing[:10]} got no answer")
        return [r for r in results if r is not None]

    def _probe(self) -> Template:
        """The outputs' shapes and dtypes, from a blank image (when a whole batch failed before
        any image succeeded in this actor)."""
        result = self.client.extract(BLANK, **self.options)
        return {key: (a.shape, a.dtype) for key, a in result.per_image[0].items()}

    def close(self) -> None:
        """Close the client's channels (Ray ends the actor's process without it)."""
        self.client.close()

    def __enter__(self) -> Extractor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, model={self.options['model']!r})"
