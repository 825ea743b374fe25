"""``LocalExtractor``: the Extractor over a layertap server of its own, started inside the actor
(for Ray GPU workers: no serving fleet to run).

How: the real server (``layertap.server.app.create_server``, the code ``layertap serve`` runs)
is started in the actor's process, on its own event-loop thread, bound to 127.0.0.1 on a port
the OS picks, with HTTP, /metrics and reflection off, plaintext, and a random bearer token only
this actor knows; the actor's client calls it there. Every image therefore takes the server's
own path (decode, batcher, preprocessing, forward, pooling, post steps, encoding), so the
results are those of a server with the same model entry, by construction. The price is one
copy of each image and of each output through the loopback interface, small beside a forward.
The server (its torch, model weights and worker thread) lives as long as the actor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from layertap.common.option_parsing import NodesArg

from ._extractor import ErrorPolicy, Extractor

if TYPE_CHECKING:
    from layertap.server.app import Server
    from layertap.server.settings import ModelConfig, Settings

ModelEntry = Any
"""A model for :class:`LocalExtractor`: a ``[[models]]`` entry as a dict, a
``layertap.server.settings.ModelConfig``, or the path of a TOML config file."""

FORCED = ("host", "port", "http", "metrics", "reflection", "auth_tokens", "auth_tokens_file")
"""Server settings LocalExtractor sets itself (with TLS off): the server is private."""
DEFAULTS: dict[str, Any] = {"client_queue_share": 1.0}
"""Settings that differ from ``layertap serve``'s defaults: the actor is the only client."""


def local_settings(
    model: str | None,
    arch: str | None,
    weights: str,
    config: ModelEntry | None,
    settings: Mapping[str, Any] | None,
) -> tuple[Settings, ModelConfig]:
    """The private server's settings (one model) and that model's entry.

    ``arch`` + ``weights`` (a torchvision model), or ``config``: a ``[[models]]`` entry (dict or
    ModelConfig), or a TOML file: its ``[server]`` table, ``[[heads]]`` and the ``[[models]]``
    entry named ``model`` (the only one, if ``model`` is not given). Then ``settings`` (any
    server setting, e.g. ``device``, ``max_batch_size``, ``torch_threads``, ``compile_budget_s``)
    and the :data:`FORCED` ones. LAYERTAP_* environment variables are not read.
    """
    from layertap.server.settings import ModelConfig, Settings, load_settings, parse_model
    from layertap.server.settings_checks import check_settings

    if (arch is None) == (config is None):
        raise ValueError("give the model as arch= (with weights=) or as config=, not both")
    base = Settings()
    if arch is not None:
        entry = ModelConfig(name=model or arch, arch=arch, weights=weights)
    elif isinstance(config, ModelConfig):
        entry = config
    elif isinstance(config, Mapping):
        values = dict(config)
        values.setdefault("name", model or values.get("arch") or "")
        entry = parse_model(values)
    elif isinstance(config, (str, os.PathLike)):
        base = load_settings(["--config", os.fspath(config)], env={})
        names = [m.name for m in base.models]
        if model is None and len(names) != 1:
            raise ValueError(f"{os.fspath(config)} has the models {names}: name one with model=")
        chosen = base.model(model) if model is not None else base.models[0]
        if chosen is None:
            raise ValueError(f"{os.fspath(config)} has no model {model!r}; it has {names}")
        entry = chosen
    else:
        raise TypeError(
            "config must be a [[models]] entry (dict), a ModelConfig or a TOML file path, got "
            f"{type(config).__name__}"
        )
    if model is not None and entry.name != model:
        raise ValueError(f"model={model!r} but the model entry is named {entry.name!r}")
    overrides = dict(settings or {})
    forced = sorted(set(overrides) & set(FORCED))
    if forced:
        raise ValueError(f"LocalExtractor sets {forced} itself (a private loopback server)")
    private = dict(
        host="127.0.0.1",
        port=0,
        http=False,
        metrics=False,
        reflection=False,
        tls_cert="",
        tls_key="",
        tls_client_ca="",
        auth_tokens=secrets.token_urlsafe(32),
        auth_tokens_file="",
    )
    values = {**DEFAULTS, **overrides, **private, "models": (entry,)}
    result = dataclasses.replace(base, **values)
    check_settings(result)
    return result, entry


class LocalServer:
    """The real server on an event loop in a daemon thread of this process."""

    def __init__(self, settings: Settings, ready_timeout: float) -> None:
        from layertap.server.app import create_server

        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="layertap-local-server", daemon=True
        )
        self.thread.start()

        async def boot() -> tuple[Server, int]:
            server, port = await create_server(settings)
            await server.start()
            await server.wait_ready(ready_timeout)
            return server, port

        try:
            self.server, self.port = self._run(boot(), ready_timeout + 60)
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def stop(self) -> None:
        if self.thread.is_alive():
            try:
                self._run(self.server.stop(0), 60)
            finally:
                self._stop_loop()


class LocalExtractor(Extractor):
    """:class:`Extractor` over a private layertap server inside the actor: ``ds.map_batches(
    LocalExtractor, fn_constructor_kwargs=dict(arch="resnet50", nodes=["layer4"], ...),
    num_gpus=1, ...)``. Same catalogue, preprocessing, pooling and post steps as a server with
    this model entry, hence the same vectors (see this module's docstring for how).

    The model: ``arch`` + ``weights`` (a torchvision architecture and weights: an enum name as
    in ``[[models]]``, a local file, or "none" with ``config`` instead), or ``config``: a
    ``[[models]]`` entry as a dict (every key of the config file, e.g. ``{"arch": "vit_b_16",
    "weights": "/data/vit.pth", "input_size": [384, 384]}``), a ``ModelConfig``, or a TOML
    config file (its ``[server]`` settings and ``[[heads]]`` apply; ``model`` names the entry
    when it has several). ``model`` is the served name (default: the entry's, or ``arch``).

    ``settings``: server settings over those (``device`` "auto" picks the GPU Ray gives the
    actor; ``max_batch_size``, ``torch_threads``, ``compile_budget_s`` ...); the server's
    address, HTTP, metrics, reflection, TLS and tokens are set here and cannot be given.
    ``ready_timeout``: seconds the model may take to load. ``window`` (default: twice the
    model's batch limit on its device) is how many images are queued for the local worker.
    The other arguments are :class:`Extractor`'s.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        nodes: NodesArg,
        arch: str | None = None,
        weights: str = "DEFAULT",
        config: ModelEntry | None = None,
        settings: Mapping[str, Any] | None = None,
        ready_timeout: float = 600.0,
        pool: str | None = None,
        normalize: bool = False,
        column: str | None = None,
        errors: ErrorPolicy = "raise",
        error_column: str = "error",
        drop_input: bool = False,
        window: int | None = None,
        timeout: float | None = 120.0,
        **options: Any,
    ) -> None:
        from layertap.server.settings import batch_limit

        server_settings, entry = local_settings(model, arch, weights, config, settings)
        self.local = LocalServer(server_settings, ready_timeout)
        try:
            runtime = self.local.server.runtime
            status = runtime.status(entry.name)
            if not status.ready:
                raise RuntimeError(
                    f"layertap.ray.LocalExtractor: model {entry.name!r} did not load: "
                    f"{status.message}"
                )
            if window is None:
                window = 2 * batch_limit(server_settings, entry, runtime.device.type)
            (token,) = server_settings.tokens()
            super().__init__(
                f"127.0.0.1:{self.local.port}",
                model=entry.name,
                nodes=nodes,
                pool=pool,
                normalize=normalize,
                column=column,
                errors=errors,
                error_column=error_column,
                drop_input=drop_input,
                window=window,
                timeout=timeout,
                token=token,
                load_balancing=None,
                **options,
            )
        except BaseException:
            self.local.stop()
            raise

    def close(self) -> None:
        """Close the client, then stop the private server."""
        try:
            super().close()
        finally:
            self.local.stop()
