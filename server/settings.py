"""One frozen Settings object: defaults < config file [server] table < LAYERTAP_* env < CLI flags.

Every field is declared once, with its default, one-line help and allowed range
(config_types.setting); its CLI flag, environment variable, --help line and range check are
derived from that declaration, so they cannot drift apart. Models and heads come from the config
file's [[models]] / [[heads]] entries (server/model_config.py); with no config file the embedded
default_config.toml is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

from .config_types import ConfigError, check_table, coerce, setting
from .limit_settings import LimitSettings, MiB
from .model_config import (
    RESIZE_KERNELS,
    HeadConfig,
    ModelConfig,
    parse_head,
    parse_model,
)
from .settings_checks import PARAMETER_HEADROOM, check_settings
from .token_entries import TokenEntry, parse_entries

__all__ = [  # what other modules import from here; the model entries live in model_config
    "FIELDS",
    "RESIZE_KERNELS",
    "ConfigError",
    "HeadConfig",
    "MiB",
    "ModelConfig",
    "Settings",
    "batch_limit",
    "build_arg_parser",
    "default_batch_size",
    "env_var",
    "flag",
    "load_settings",
    "parse_head",
    "parse_model",
]

ENV_PREFIX = "LAYERTAP_"


DEFAULT_BATCH_SIZE = {"cpu": 4, "cuda": 32}
"""max_batch_size = 0 picks this per device type: on CPU bigger batches are slower per image
(mobilenet_v2, 2 cores: 64 images/s at batch 4, 48 at 8, 39 at 16 — docs/BENCHMARKS.md); on a GPU
batching pays (32 is a starting point; no GPU measurement yet)."""


def default_batch_size(device_type: str) -> int:
    return DEFAULT_BATCH_SIZE.get(device_type, 8)


def batch_limit(settings: Settings, cfg: ModelConfig | None, device_type: str) -> int:
    """The configured largest batch: the model's own max_batch_size, else the server's, where
    0 means the device's measured default (before any out-of-memory lowers it)."""
    limit = cfg.max_batch_size if cfg is not None and cfg.max_batch_size > 0 else 0
    return limit or settings.max_batch_size or default_batch_size(device_type)


@dataclass(frozen=True)
class Settings(LimitSettings):
    """Server settings (the limits and budgets are declared in limit_settings.py). Tests build
    Settings(...) directly."""

    host: str = setting(
        "127.0.0.1", "interface to bind; 0.0.0.0 to serve other machines (127.0.0.1 keeps it local)"
    )
    port: int = setting(50051, "gRPC port; 0 picks a free one", minimum=0, maximum=65535)
    config: str | None = setting(
        None, "TOML file with [server] settings and [[models]]; empty uses the embedded default"
    )
    device: str = setting("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    devices: tuple[str, ...] = setting(
        (),
        "comma-separated devices, one worker thread and model copy each (e.g. cuda:0,cuda:1); "
        "requests go to the least loaded; empty: just 'device'",
    )
    max_batch_size: int = setting(
        0,
        "most images stacked into one forward; 0: the measured default of the device, 4 on CPU "
        "(bench/batch_sizes.py and bench/compare.py: batch 4 is fastest per image, 8 and 16 "
        "slower) and 32 on CUDA (not measured here)",
        minimum=0,
    )
    preferred_batch_size: int = setting(
        4,
        "while the worker is busy, a batch stops waiting once it holds this many images (Triton's "
        "preferred size; CPU-measured best 4); 0: wait for a full batch",
        minimum=0,
    )
    max_wait_ms: float = setting(
        2.0, "how long a batch stays open for more images once the worker is busy", minimum=0
    )
    low_priority_max_wait_ms: float = setting(
        1000.0,
        "after this wait a PRIORITY_LOW image counts as normal, so bulk work is never starved by "
        "interactive traffic",
        minimum=0,
    )
    companion_wait_ms: float = setting(
        30.0,
        "after a batch of several images, the next batch of the same model and nodes waits at "
        "most this long (and at most 0.3 of that batch's run time) for those clients' next "
        "requests, so closed-loop clients keep sharing forwards; 0: off (a request after a batch "
        "of one never waits)",
        minimum=0,
    )
    share_forwards: bool = setting(
        True,
        "one forward serves the node sets of a model's requests in a batch (the union) when they "
        "end at the same deepest node; off batches only requests with equal node sets (for "
        "comparison benchmarks)",
    )
    share_across_depths: bool = setting(
        False,
        "with share_forwards, also let shallow node sets ride a deeper forward (one forward per "
        "batch whatever the depths): fewer, bigger forwards, which can pay where per-forward cost "
        "dominates (GPU, small batches); on CPU measured slower",
    )
    gpu_decode: str = setting(
        "auto",
        "decode JPEGs with nvJPEG on the CUDA device (auto: when serving on CUDA; on: the same; "
        "off: CPU decode); a no-op on CPU",
        choices=("auto", "on", "off"),
    )
    get_parameters: bool = setting(
        True,
        "serve GetParameters (a model's weights and buffers over the wire); off: it answers "
        "UNIMPLEMENTED, for servers whose weights must not leave them",
    )
    keep_freed_memory: bool = setting(
        True,
        "glibc malloc keeps freed activation memory for the next forward instead of returning it "
        "to the OS and page-faulting it back every batch (CPU forwards about 1.5x faster at batch "
        "4 measured; the process keeps its high-water mark)",
    )
    decode_threads: int = setting(
        2, "threads that decode and preprocess images (off the event loop)", minimum=1
    )
    extractor_cache_size: int = setting(
        32,
        "extractors kept per model, the most used ones (uses fade over time); they share the "
        "weights",
        minimum=1,
    )
    torch_threads: int = setting(
        0,
        "torch intra-op threads per worker; 0: the usable cores split between the CPU workers (at "
        "least 1; the decode threads are not subtracted)",
        minimum=0,
    )
    shutdown_grace_s: float = setting(
        10.0, "seconds in-flight requests get to finish on SIGTERM", minimum=0
    )
    shutdown_delay_s: float = setting(
        1.0,
        "on SIGTERM, seconds health says NOT_SERVING while still serving, so probes and load "
        "balancers see it before the port closes",
        minimum=0,
    )
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting(
        "json", "json (one object per line, for log pipelines) or text", choices=("json", "text")
    )
    metrics: bool = setting(True, "serve Prometheus metrics over HTTP")
    metrics_host: str = setting("", "interface for /metrics; empty uses host")
    metrics_port: int = setting(
        9464, "HTTP port for /metrics; 0 picks a free one", minimum=0, maximum=65535
    )
    http: bool = setting(
        True,
        "serve HTTP/REST on http_port: the KServe v2 REST endpoints (tritonclient.http, KServe) "
        "and /v1/models, /v1/extract for curl; the same tokens, TLS, limits and batcher as gRPC",
    )
    http_host: str = setting("", "interface for the HTTP API; empty uses host")
    http_port: int = setting(
        8000,
        "HTTP/REST port (8000, as Triton and KServe); 0 picks a free one",
        minimum=0,
        maximum=65535,
    )
    reflection: bool = setting(
        True, "gRPC server reflection (grpcurl and friends list and describe services)"
    )
    warmup: bool = setting(True, "run one real forward per model before health says SERVING")
    compile_budget_s: float = setting(
        300.0,
        "compile = 'auto': seconds each node set's background compile may take (batch sizes "
        "past it stay eager); 0 keeps every model eager without timing it",
        minimum=0,
    )
    compile_cache_dir: str = setting(
        "",
        "inductor's cache of compiled code (TORCHINDUCTOR_CACHE_DIR), kept between restarts "
        "(a volume in deploy/); empty: torch's default, /tmp/torchinductor_$USER",
    )
    max_connection_age_s: float = setting(
        0.0, "close connections after this age so clients re-resolve; 0 = never"
    )
    max_connection_age_grace_s: float = setting(
        10.0, "time in-flight RPCs get when a connection is aged out", minimum=0
    )
    tls_cert: str = setting(
        "", "PEM server certificate; with tls_key enables TLS (plaintext otherwise)"
    )
    tls_key: str = setting("", "PEM private key of tls_cert")
    tls_client_ca: str = setting(
        "", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)"
    )
    auth_tokens: str = setting(
        "",
        "comma-separated bearer tokens clients must send, each optionally followed by its fair-"
        "queuing weight and the only models it may use, space-separated ('tok-a weight=2 "
        "resnet50 vit, tok-b'; secret; empty: no auth)",
        secret=True,
    )
    auth_tokens_file: str = setting(
        "",
        "file with one bearer token per line, optionally followed by its models like "
        "auth_tokens (secret; '#' starts a comment), added to auth_tokens",
    )
    auth_open_health: bool = setting(
        True, "leave health and reflection open without a token (for probes)"
    )
    models: tuple[ModelConfig, ...] = setting((), "the [[models]] entries", table=True)
    heads: tuple[HeadConfig, ...] = setting(
        (), "the [[heads]] entries, loaded at start-up", table=True
    )

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def tokens(self) -> frozenset[str]:
        """Every accepted bearer token (from auth_tokens and auth_tokens_file)."""
        return frozenset(self.token_models())

    def token_entries(self) -> dict[str, TokenEntry]:
        """Every accepted bearer token with its models and weight (server/token_entries.py),
        from auth_tokens (comma-separated entries) and auth_tokens_file (one per line)."""
        entries = [
            (f"auth_tokens entry {n}", e) for n, e in enumerate(self.auth_tokens.split(","), 1)
        ]
        if self.auth_tokens_file:
            text = Path(self.auth_tokens_file).expanduser().read_text()
            entries += [
                (f"auth_tokens_file line {n}", e) for n, e in enumerate(text.splitlines(), 1)
            ]
        return parse_entries(entries)

    def token_models(self) -> dict[str, frozenset[str] | None]:
        """Every accepted bearer token and the models it may use (None: every model)."""
        return {t: e.models for t, e in self.token_entries().items()}

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets replaced (for --print-config)."""
        data = dataclasses.asdict(self)
        for name in SECRETS:
            if data[name]:
                data[name] = "<redacted>"
        data["models"] = [
            {k: v for k, v in m.items() if v not in (None, (), {}, "")} for m in data["models"]
        ]
        data["heads"] = [{k: v for k, v in h.items() if v != ""} for h in data["heads"]]
        return data


# name -> help of every setting a flag and LAYERTAP_* can set, in --help order; all derived
# from the declarations above so help, flag, env var and range cannot drift apart.
FIELDS: dict[str, str] = {
    f.name: f.metadata["help"] for f in dataclasses.fields(Settings) if not f.metadata["table"]
}
SECRETS = tuple(f.name for f in dataclasses.fields(Settings) if f.metadata["secret"])


def flag(name: str) -> str:
    """The command-line flag of a setting: max_batch_size -> --max-batch-size."""
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """The environment variable of a setting: max_batch_size -> LAYERTAP_MAX_BATCH_SIZE."""
    return ENV_PREFIX + name.upper()


_SERVER_TYPES = {k: v for k, v in get_type_hints(Settings).items() if k in FIELDS}


def _coerce(name: str, value: Any) -> Any:
    """Convert a string (env/CLI) or TOML value to the field's type."""
    if name == "config":
        return str(value) if value not in (None, "") else None
    return coerce(name, value, getattr(Settings(), name))


def _read_toml(path: str | None) -> tuple[dict[str, Any], Path | None]:
    if path:
        p = Path(path).expanduser()
        try:
            return tomllib.loads(p.read_text()), p.resolve().parent
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    text = resources.files("layertap.server").joinpath("default_config.toml").read_text()
    return tomllib.loads(text), None


def load_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings from defaults, config file, environment and command-line flags."""
    env = os.environ if env is None else env
    args = build_arg_parser().parse_args(argv if argv is not None else [])
    cli = {k: v for k, v in vars(args).items() if v is not None and k in FIELDS}
    from_env = {name: env[env_var(name)] for name in FIELDS if env_var(name) in env}
    config_path = cli.get("config", from_env.get("config")) or None
    data, base_dir = _read_toml(config_path)
    server_table = data.get("server", {})
    # strings are parsed by _coerce ("false", "8"), like the same values from env and flags
    typed = {k: v for k, v in server_table.items() if not isinstance(v, str)}
    check_table("[server]", server_table, _SERVER_TYPES, skip=set(server_table) - set(typed))
    merged: dict[str, Any] = {}
    for source in (server_table, from_env, cli):
        for name, value in source.items():
            merged[name] = _coerce(name, value)
    merged["config"] = config_path
    if "max_parameter_bytes" not in merged:  # follow a lowered max_message_bytes
        ceiling = merged.get("max_message_bytes", Settings.max_message_bytes) - PARAMETER_HEADROOM
        merged["max_parameter_bytes"] = min(Settings.max_parameter_bytes, max(1, ceiling))
    models = tuple(parse_model(m, base_dir) for m in data.get("models", []))
    heads = tuple(parse_head(h, base_dir) for h in data.get("heads", []))
    settings = Settings(**merged, models=models, heads=heads)
    check_settings(settings)
    return settings


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layertap serve",
        description="Serve intermediate layers of vision models over gRPC.",
        epilog=f"Every flag also reads {env_var('<NAME>')} (e.g. {env_var('port')}).",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings (secrets redacted) as JSON and exit",
    )
    defaults = Settings()
    for name, why in FIELDS.items():
        default = getattr(defaults, name)
        help = f"{why} (default: {default}; env {env_var(name)})"
        parser.add_argument(flag(name), dest=name, default=None, help=help)
    return parser
