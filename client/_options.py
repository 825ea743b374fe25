"""Settings and tables shared by the clients and the CLI: channel options, per-call deadlines,
and the values extract options take (pools, dtypes, post ops, priorities) with the wire dtypes."""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from collections.abc import Sequence
from typing import Any

from layertap.common.options import (  # the client's views of the tables, re-exported
    FLOAT_DTYPES,
)

PARAMETER_DTYPES = FLOAT_DTYPES

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""64 MiB each way: gRPC's own 4 MiB receive default is too small for raw activations."""

DEFAULT_LOAD_BALANCING = "round_robin"
"""Spread calls over every address the target resolves to (all pods behind a headless Service,
every address of an ``ipv4:`` list); gRPC's own default, pick_first, sends everything to one."""
DEFAULT_RETRIES = 4
"""Retries of a call that failed with UNAVAILABLE or a transient RESOURCE_EXHAUSTED (see
``_retry``): at most ``retries + 1`` attempts, with exponential backoff and full jitter."""
MAX_RETRIES = 10
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000

# --------------------------------------------------------------------------- extract options


# --------------------------------------------------------------------------- channel

_POLICY_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PORT = re.compile(r"^[0-9]{1,5}$")


class _Unset(enum.Enum):
    """Sentinel type: "use the client's default timeout", distinct from ``None`` (no deadline)."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "<client default>"


UNSET = _Unset.UNSET
Timeout = float | None | _Unset
"""Per-call timeout in seconds; ``None`` waits forever; unset uses the client's default."""


def check_retries(retries: int) -> int:
    """``retries`` must be an int in 0..MAX_RETRIES (0: every call is tried once)."""
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int, got {retries!r}")
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be in 0..{MAX_RETRIES}, got {retries}")
    return retries


def service_config(load_balancing: str | None, retries: int = 0) -> dict[str, Any]:
    """The gRPC service config both clients put on their channel (``grpc.service_config``).

    ``loadBalancingConfig`` selects ``load_balancing`` (``None``: gRPC's default, pick_first);
    empty when that is off. ``retries`` is only validated: the SDK retries calls itself
    (``_retry``), so the channel has no gRPC ``retryPolicy`` and the two layers cannot
    multiply attempts. gRPC's transparent retries (a call that never reached a server) stay
    on; they are not attempts.
    """
    if load_balancing is not None and (
        not isinstance(load_balancing, str) or not _POLICY_NAME.match(load_balancing)
    ):
        raise ValueError(
            "load_balancing must be a gRPC policy name such as 'round_robin' or 'pick_first', "
            f"or None, got {load_balancing!r}"
        )
    check_retries(retries)
    config: dict[str, Any] = {}
    if load_balancing is not None:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    return config


def channel_options(
    max_message_bytes: int,
    *,
    load_balancing: str | None = None,
    retries: int = 0,
) -> list[tuple[str, int | str]]:
    """Channel arguments of both clients.

    - explicit send/receive limits, so large batches fail loudly only past the chosen size;
    - keepalive pings every 30 s, only while calls are in flight (``permit_without_calls`` 0),
      10 s to answer: a replica that vanished without closing its connections (node failure)
      is noticed during a long call. This is within the ping policy of a gRPC server with
      default settings: without calls no pings are sent at all (the server would allow one per
      2 hours), and a client sends at most 2 pings until the server sends data again
      (``grpc.http2.max_pings_without_data``), below the server's 3 strikes before
      GOAWAY ``too_many_pings``;
    - the :func:`service_config` for ``load_balancing`` (``retries`` is validated there).
      Service configs published by the name resolver (DNS TXT records) are ignored, so these
      settings hold for every target.
    """
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int):
        raise TypeError(f"max_message_bytes must be an int, got {max_message_bytes!r}")
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    config = service_config(load_balancing, retries)
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.service_config_disable_resolution", 1),
    ]
    if config:
        options.append(("grpc.service_config", json.dumps(config, separators=(",", ":"))))
    return options


def channel_target(target: str) -> str:
    """The gRPC target for ``target``; a plain comma-separated list of IP addresses with ports
    (``10.0.0.1:50051,10.0.0.2:50051``, ``[::1]:5001,[::1]:5002``) becomes gRPC's ``ipv4:`` /
    ``ipv6:`` list. Anything else is returned unchanged (``host:port``,
    ``dns:///name:port``, ``ipv4:a:p,b:p``, ``unix:path``).
    """
    if not isinstance(target, str):
        raise TypeError(f"target must be a str, got {type(target).__name__}")
    if "," not in target or "://" in target or target.startswith(("ipv4:", "ipv6:", "unix")):
        return target
    versions = set()
    for part in target.split(","):
        host, sep, port = part.strip().rpartition(":")
        try:
            address = ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
        except ValueError:
            address = None
        if (
            address is None
            or not sep
            or not _PORT.match(port)
            or not 0 < int(port) < 65536
            or (address.version == 6) != host.startswith("[")
        ):
            raise ValueError(
                f"cannot use {part.strip()!r} in the target list {target!r}: a comma-separated "
                "target must list IP addresses with ports (10.0.0.1:50051 or [fd00::1]:50051); "
                "for a DNS name use dns:///name:port (with load balancing over its addresses)"
            )
        versions.add(address.version)
    if len(versions) > 1:
        raise ValueError(f"a target list cannot mix IPv4 and IPv6 addresses: {target!r}")
    parts = ",".join(p.strip() for p in target.split(","))
    return f"ipv{versions.pop()}:{parts}"


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
