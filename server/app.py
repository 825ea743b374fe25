"""Server assembly: `create_server(settings)` wires the stages; `main()` runs it until a signal.

Kept apart from main() so tests start a real server on 127.0.0.1:0 with a real channel.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from layertap.v1 import layertap_pb2

from . import admission, logs, process, security, thread_roles
from .admission import Admission
from .auto_compile import BACKGROUND
from .batcher import Batcher
from .batching import BatchPolicy
from .devices import cuda_memory, default_torch_threads, pick_device, torch_versions
from .dispatch import Dispatcher
from .heads import Head, load_head
from .metrics import Metrics
from .prepare import init_decode_thread
from .settings import (
    ConfigError,
    Settings,
    batch_limit,
    build_arg_parser,
    load_settings,
)
from .worker import Item, ModelRuntime, SharedWeights

if TYPE_CHECKING:
    from .http_app import HttpServer
    from .pipeline import Pipeline
    from .service import FeatureService

log = logging.getLogger("layertap.server")

SERVICE_NAME = layertap_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_health_name(model: str) -> str:
    """The grpc.health.v1 service name of one model."""
    return f"layertap.model.{model}"


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    """Explicit message limits: gRPC's 4 MiB default is too small for raw feature maps."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]


def server_options(settings: Settings) -> list[tuple[str, int]]:
    options = channel_options(settings)
    # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: one connection's calls beyond it wait in the
    # client's gRPC, so one connection cannot open unbounded calls (slow unary uploads included)
    options.append(("grpc.max_concurrent_streams", settings.max_streams_per_connection))
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    return options


@dataclass
class Server:
    """A bound (not yet started) layertap server and the pieces tests may want to look at."""

    grpc_server: grpc.aio.Server
    runtime: ModelRuntime  # the first device's: catalogues, status (every device has the same)
    batcher: Batcher | Dispatcher  # a Dispatcher over one Batcher per device when several
    decode_pool: ThreadPoolExecutor
    settings: Settings
    health: HealthServicer
    metrics: Metrics | None
    metrics_port: int | None = None
    _load_task: asyncio.Task[None] | None = None
    runtimes: list[ModelRuntime] = field(default_factory=list)
    admission: Admission | None = None  # the calls counted in, by kind
    pipeline: Pipeline | None = None  # its memory budget, fair pool
    service: FeatureService | None = None
    http: HttpServer | None = None  # started by start() when settings.http

    def __post_init__(self) -> None:
        if not self.runtimes:
            self.runtimes = [self.runtime]

    async def start(self) -> None:
        """Start serving; models load and warm up on the worker in the background, and health
        says SERVING once loading finished with at least one model ready."""
        if self.metrics is not None:
            host = self.settings.metrics_host or self.settings.host
            self.metrics_port = self.metrics.serve(host, self.settings.metrics_port)
        await self.grpc_server.start()
        if self.settings.http and self.service is not None and self.admission is not None:
            from . import http_app

            self.http = await http_app.start(self.settings, self.service, self.admission)
        self.batcher.start()
        self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        async def report(name: str, ok: bool) -> None:
            await self.health.set(model_health_name(name), SERVING if ok else NOT_SERVING)

        if len(self.runtimes) == 1:
            await self.runtime.load_all(report)
        else:  # every device loads its own copy, in parallel; a model is ready when on all
            outcomes: dict[str, list[bool]] = {}

            async def collect(name: str, ok: bool) -> None:
                outcomes.setdefault(name, []).append(ok)
                if len(outcomes[name]) == len(self.runtimes):
                    await report(name, all(outcomes[name]))

            await asyncio.gather(*(rt.load_all(collect) for rt in self.runtimes))
            if self.runtime.shared is not None:
                self.runtime.shared.clear()  # the devices hold their copies now
        overall = SERVING if self.runtime.ready_models() else NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, overall)

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.gather(*(rt.wait_ready(timeout) for rt in self.runtimes))
        if self._load_task is not None:  # health is updated right after loading
            await asyncio.wait_for(asyncio.shield(self._load_task), timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING first, then refuse new RPCs (UNAVAILABLE) and let in-flight ones
        finish within `grace`, then release threads."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        http = [self.http.stop()] if self.http is not None else []
        await asyncio.gather(self.grpc_server.stop(grace), *http)
        await self.batcher.close(drain=False)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        for runtime in self.runtimes:
            runtime.shutdown()
        if self.metrics is not None:
            self.metrics.close()


def load_heads(settings: Settings) -> dict[str, Head]:
    """Every [[heads]] entry, read and checked now: a bad head file stops start-up (ConfigError
    with the file's problem) rather than failing requests later."""
    heads: dict[str, Head] = {}
    for entry in settings.heads:
        try:
            heads[entry.name] = load_head(entry.name, entry.file, entry.model)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return heads


async def create_server(settings: Settings) -> tuple[Server, int]:
    """Build every stage and bind the port; returns the server and the port actually bound."""
    # settings problems (bad PEM files, unreadable token file, bad head files) surface before
    # any thread starts
    credentials = security.server_credentials(settings)
    thread_roles.register("event loop")  # create_server runs on the server's loop
    heads = load_heads(settings)
    if settings.compile_cache_dir:  # read by inductor at its first compile, after this
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(settings.compile_cache_dir)
    metrics = Metrics(m.name for m in settings.models) if settings.metrics else None
    # the token check first: refused calls are never counted by admission
    gate = admission.interceptor(settings, metrics)
    interceptors = [*security.interceptors(settings), gate]
    runtimes = _runtimes(settings, metrics)
    runtime = runtimes[0]
    if metrics is not None:
        metrics.set_build_info(str(runtime.device), torch_versions(), cuda_memory)
        metrics.compiles_pending.set_function(lambda: BACKGROUND.pending)
    batchers = [_batcher(settings, rt, metrics, name) for rt, name in _names(runtimes)]
    batcher: Batcher | Dispatcher = batchers[0] if len(batchers) == 1 else Dispatcher(batchers)
    if metrics is not None and len(batchers) > 1:  # one gauge: the total over devices
        for b in batchers:
            b.on_queue_depth = lambda _depth: metrics.queue_depth.set(batcher.queued)
    cuda = [rt.device for rt in runtimes if rt.device.type == "cuda"]
    gpu_decode = str(cuda[0]) if cuda and settings.gpu_decode != "off" else None
    decode_pool = ThreadPoolExecutor(
        settings.decode_threads,
        thread_name_prefix="decode",
        initializer=init_decode_thread,
        initargs=(gpu_decode,),
    )
    # no maximum_concurrent_rpcs here: gRPC's bound counts streams and probes alike, so idle
    # Health.Watch streams could take every slot; admission counts each kind apart
    grpc_server = grpc.aio.server(options=server_options(settings), interceptors=interceptors)
    # imported here: the servicer module pulls in protobuf stubs and codec
    from . import codec, kserve_grpc
    from .compare import compare
    from .pipeline import Pipeline
    from .rpc import add_to_server
    from .service import FeatureService

    pipeline = Pipeline(settings, runtime, batcher, decode_pool, metrics, heads=heads)
    if metrics is not None:
        memory = pipeline.memory
        metrics.memory_reserved.set_function(lambda: memory.used)
    service = FeatureService(
        settings,
        pipeline,
        functools.partial(compare, pipeline),
        codec.IMAGE_FORMATS,
        codec.RAW_INPUT_DTYPES,
    )
    add_to_server(service, grpc_server)
    kserve_grpc.register(service, grpc_server)  # inference.GRPCInferenceService (KServe v2)
    health = HealthServicer()
    for name in ("", SERVICE_NAME, *(model_health_name(m.name) for m in settings.models)):
        await health.set(name, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    if settings.reflection:
        names = (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, grpc_server)

    address = f"{settings.host}:{settings.port}"
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(address)
        else:
            port = grpc_server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"cannot bind {address}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot bind {address}")
    server = Server(
        grpc_server,
        runtime,
        batcher,
        decode_pool,
        settings,
        health,
        metrics,
        runtimes=runtimes,
        admission=gate,
        pipeline=pipeline,
        service=service,
    )
    return server, port


def _runtimes(settings: Settings, metrics: Metrics | None) -> list[ModelRuntime]:
    """One runtime (worker thread, model copies) per entry of `devices` (default: `device`);
    CPU workers split the cores between them."""
    names = settings.devices or (settings.device,)
    devices = [pick_device(name) for name in names]
    cpu_workers = sum(1 for d in devices if d.type == "cpu")
    threads = default_torch_threads(settings, cpu_workers)
    shared = SharedWeights() if len(devices) > 1 else None  # one build, a copy per device
    return [
        ModelRuntime(settings, metrics, device=str(d), torch_threads=threads, shared=shared)
        for d in devices
    ]


def _names(runtimes: list[ModelRuntime]) -> list[tuple[ModelRuntime, str]]:
    """Each runtime with the name responses report: its device, numbered when listed twice."""
    devices = [str(rt.device) for rt in runtimes]
    return [
        (rt, d if devices.count(d) == 1 else f"{d}/{i}")
        for i, (rt, d) in enumerate(zip(runtimes, devices, strict=True))
    ]


def _batcher(
    settings: Settings, runtime: ModelRuntime, metrics: Metrics | None, name: str
) -> Batcher:
    def group_key(key: Hashable, item: Item) -> Hashable:
        """Which requests may share a forward (see share_forwards / share_across_depths)."""
        if not isinstance(key, tuple):
            return key
        if not settings.share_forwards:  # only requests for the same node set
            return (*key, item.nodes)
        # Same deepest node: the union adds no depth to anyone's forward (the shallower nodes
        # are computed on the way); a shallow set riding a deep forward would pay the whole
        # network (measured on CPU: 18 vs 24.5 images/s for 4 node sets of resnet50).
        order = runtime.model(key[0]).catalog.order
        return (*key, max(item.nodes, key=order.__getitem__))

    return Batcher(
        runtime.run_batch,
        max_queue=settings.max_queue_images,
        client_share=settings.client_queue_share,
        client_wait_s=settings.client_wait_ms / 1000.0,
        cost=fair_cost,
        policy=lambda key: batch_policy(settings, runtime, key),
        low_priority_max_wait_s=settings.low_priority_max_wait_ms / 1000.0,
        companion_wait_s=settings.companion_wait_ms / 1000.0,
        group_key=None if settings.share_forwards and settings.share_across_depths else group_key,
        name=name,
        on_queue_depth=metrics.queue_depth.set if metrics else None,
        on_batch=metrics.observe_batch if metrics else None,
        on_drop=metrics.observe_drop if metrics else None,
    )


REFERENCE_PIXELS = 224 * 224


def fair_cost(item: Item) -> float:
    """An item's cost in fair queuing: its input pixels over a 224 x 224 image's (compute grows
    with pixels: a TTA view at scale 2 costs 4)."""
    return float(item.tensor.shape[-2] * item.tensor.shape[-1]) / REFERENCE_PIXELS


def batch_policy(settings: Settings, runtime: ModelRuntime, key: object) -> BatchPolicy:
    """The model's own max_batch_size / preferred_batch_size / max_wait_ms, else the server's;
    the size limit lowered after an out-of-memory on this runtime's device."""
    name = key[0] if isinstance(key, tuple) and key else None
    cfg = settings.model(name) if isinstance(name, str) else None
    limit = batch_limit(settings, cfg, runtime.device.type)
    cap = runtime.batch_cap(name) if isinstance(name, str) else None
    if cap:
        limit = min(limit, cap)
    preferred = settings.preferred_batch_size
    if cfg is not None and cfg.preferred_batch_size is not None:
        preferred = cfg.preferred_batch_size
    wait_ms = settings.max_wait_ms
    if cfg is not None and cfg.max_wait_ms is not None:
        wait_ms = cfg.max_wait_ms
    return BatchPolicy(limit, preferred, wait_ms / 1000.0)


async def serve(settings: Settings) -> None:
    server, port = await create_server(settings)
    await server.start()
    scheme = "tls" if settings.tls_cert else "plaintext"
    log.info(
        "layertap serving on %s:%d (%s, device %s)",
        settings.host,
        port,
        scheme,
        server.runtime.device,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info(
        "shutting down: health NOT_SERVING for %.1fs, then draining for up to %.0fs",
        settings.shutdown_delay_s,
        settings.shutdown_grace_s,
    )
    await server.health.enter_graceful_shutdown()
    await asyncio.sleep(settings.shutdown_delay_s)
    await server.stop()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """`layertap serve`: settings from flags, LAYERTAP_* and the config file, then serve."""
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        print(f"layertap serve: {exc}", file=sys.stderr)
        return 2
    if build_arg_parser().parse_args(args).print_config:
        print(json.dumps(settings.redacted(), indent=2, default=str))
        return 0
    logs.configure(settings.log_level, settings.log_format)
    process.single_threaded_main()
    if settings.keep_freed_memory:
        process.keep_freed_memory()
    try:
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"layertap serve: {exc}", file=sys.stderr)
        return 2
    if BACKGROUND.pending:  # drained; but finalising the interpreter under a compile that is
        # still in inductor's C++ threads aborts ("terminate called without an active exception")
        log.info("exiting with %d background compile(s) unfinished", BACKGROUND.pending)
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
