"""The server's limits and budgets, one group of Settings fields (Settings inherits them): how
much a request, a client, a stream and the whole server may hold. Declared like every setting
(config_types.setting): default, one-line help, range."""

from __future__ import annotations

from dataclasses import dataclass

from .config_types import setting

MiB = 1024 * 1024


@dataclass(frozen=True)
class LimitSettings:
    max_queue_images: int = setting(
        512, "images waiting for the worker before requests get RESOURCE_EXHAUSTED", minimum=1
    )
    client_queue_share: float = setting(
        0.25,
        "the share of max_queue_images (and of the memory budget) one client, its bearer token "
        "else its connection, may always hold queued or running; more of the queue while the "
        "others hold little, never the share kept free for a newcomer; past it that client "
        "waits client_wait_ms, then gets RESOURCE_EXHAUSTED while others are served (1: no "
        "per-client bound)",
        minimum=0.01,
        maximum=1.0,
    )
    client_wait_ms: float = setting(
        1000.0,
        "how long a client past its client_queue_share waits for its earlier images to finish "
        "before RESOURCE_EXHAUSTED (a waiting call costs no decode; refusing at once let a "
        "client retrying without pause spend the CPU on refusals)",
        minimum=0,
    )
    memory_budget_bytes: int = setting(
        0,
        "bytes all requests together may hold at their estimated peak (inputs, forwards, kept "
        "maps, answers); past it requests get RESOURCE_EXHAUSTED (retryable); 0: half the "
        "memory of the machine or of the container's cgroup",
        minimum=0,
    )
    max_request_memory_bytes: int = setting(
        0,
        "bytes one request may hold at its estimated peak; past it RESOURCE_EXHAUSTED with what "
        "would fit; 0: a quarter of memory_budget_bytes",
        minimum=0,
    )
    max_images_per_request: int = setting(64, "images one Extract call may carry", minimum=1)
    max_image_bytes: int = setting(20 * MiB, "encoded bytes one image may have", minimum=1)
    max_image_pixels: int = setting(
        40_000_000,
        "width x height one image may have (checked from the header, pre-decode)",
        minimum=1,
    )
    max_message_bytes: int = setting(
        64 * MiB, "gRPC send/receive message limit, both directions", minimum=1
    )
    max_concurrent_rpcs: int = setting(
        1024,
        "unary RPCs served at once (Health.Check is never refused; streaming RPCs have "
        "max_streaming_rpcs); more get RESOURCE_EXHAUSTED (bounds memory when clients do not wait)",
        minimum=1,
    )
    max_streaming_rpcs: int = setting(
        256,
        "streaming RPCs open at once (ExtractStream, Health.Watch, reflection); more get "
        "RESOURCE_EXHAUSTED; they never take the unary calls' max_concurrent_rpcs",
        minimum=1,
    )
    max_streaming_rpcs_per_connection: int = setting(
        32,
        "streaming RPCs one client connection may hold open; more on it get RESOURCE_EXHAUSTED",
        minimum=1,
    )
    max_streams_per_connection: int = setting(
        256,
        "calls of any kind one connection may have in progress (HTTP/2 "
        "SETTINGS_MAX_CONCURRENT_STREAMS); the client's gRPC holds back its further calls",
        minimum=1,
    )
    stream_idle_timeout_s: float = setting(
        600.0,
        "a streaming RPC with no message in or out for this long is ended with UNAVAILABLE "
        "(retryable) to free its slot; Health.Watch included; 0: never",
        minimum=0,
    )
    max_stream_in_flight: int = setting(
        64,
        "unanswered items the server holds per ExtractStream; it reads no more until one is "
        "answered, so gRPC flow control pushes back on the client",
        minimum=1,
    )
    max_parameter_bytes: int = setting(
        32 * MiB,
        "largest GetParameters answer in tensor bytes; at most max_message_bytes - 1 MiB "
        "(default: 32 MiB, or that bound when it is lower)",
        minimum=1,
    )
    max_builds_per_client_per_minute: int = setting(
        30,
        "extractor builds (requests for a node set with none cached) one client may cause a "
        "minute, refilled evenly; past it RESOURCE_EXHAUSTED (retryable); 0: no bound",
        minimum=0,
    )
    result_cache_bytes: int = setting(
        0,
        "bytes of finished per-image Extract results kept, keyed by the image's sha256, the "
        "model's weights and every option, so a repeated image is answered without decode or "
        "forward (least recently used evicted first; held outside memory_budget_bytes); 0: off",
        minimum=0,
    )
