"""One frozen Settings object: defaults < config file [server] table < LAYERTAP_* env < CLI flags.

Every field has a default, a one-line reason, a CLI flag and an environment variable, all derived
from the single FIELDS table below so the four can never drift apart. Models come from the
config file's [[models]] entries (TOML); with no config file the embedded default_config.toml
is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

from .config_types import ConfigError, check_table

ENV_PREFIX = "LAYERTAP_"
MiB = 1024 * 1024
# room left in a GetParameters answer for names and shapes next to the tensor bytes
PARAMETER_HEADROOM = MiB


@dataclass(frozen=True)
class ModelConfig:
    """One servable model. Only names listed here are reachable by clients."""

    name: str
    # A torchvision classification architecture name (torchvision.models.list_models()).
    arch: str | None = None
    # Or "package.module:callable" returning an nn.Module (custom, timm, face models).
    factory: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    # torchvision weights enum name ("DEFAULT", "IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2"),
    # a local .safetensors/.pth/.pt file, or "none" (random init).
    weights: str = "DEFAULT"
    # Serve random init when the weights are "none" or not cached locally (never downloads).
    allow_random: bool = False
    # Model input (H, W); default: the weights' own transforms.
    input_size: tuple[int, int] | None = None
    resize_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None
    # Resize kernel for uint8 images: "uint8" (default: torchvision v2's native kernel, Pillow's
    # resampling, ~6x cheaper on CPU) or "float" (bit-exact with weights.transforms() on tensors).
    resize_kernel: str = "uint8"
    # torch.fx tracer settings: module classes kept as leaves and functions kept opaque,
    # each as "package.module:Name".
    leaf_modules: tuple[str, ...] = ()
    autowrap_functions: tuple[str, ...] = ()
    # Largest batch for this model (0: the server's max_batch_size).
    max_batch_size: int = 0
    # Batching overrides for this model (unset: the server's max_wait_ms / preferred_batch_size).
    max_wait_ms: float | None = None
    preferred_batch_size: int | None = None
    # Node sets whose extractors are built and run at load, before the model reports ready,
    # so their first request neither traces nor (with compile) compiles; names as clients send
    # them. Each runs once on a zero batch per size in warmup_batch_sizes.
    warmup_nodes: tuple[tuple[str, ...], ...] = ()
    warmup_batch_sizes: tuple[int, ...] = (1,)
    # channels_last memory format for weights and input batches (faster convolutions on
    # recent CPUs and tensor-core GPUs). Unset ("auto"): on the CPU, chosen at load by timing the
    # model's forward at its batch size in both layouts (kept when it runs and is >= 10 %
    # faster; not timed with warmup off or under 20 ms); elsewhere off.
    channels_last: bool | None = None
    # Fold each eval-mode BatchNorm into the convolution before it in every extractor that
    # does not return that convolution's own output (server/fusion.py): the same values to
    # float32 rounding, a faster CPU forward, one extra copy of the folded convolutions.
    fold_batchnorm: bool = True
    # Run the forward under torch.autocast in this dtype: "" (float32), "bfloat16" (CPU or
    # CUDA) or "float16" (CUDA only). Outputs still come back in the requested output dtype.
    autocast: str = ""
    # torch.compile each extractor on the worker: "" (off), "default", "reduce-overhead",
    # "max-autotune"; compile_backend "inductor" needs a C++ compiler (and Triton on CUDA).
    compile: str = ""
    compile_backend: str = "inductor"
    # How nodes are found and extracted: "fx" (torch.fx graph nodes; a trace failure stops the
    # load), "hooks" (forward hooks on named modules: module outputs only) or "auto" (fx, falling
    # back to hooks when tracing fails; DescribeModel reports the mode and the trace error).
    extraction: str = "auto"
    # Serve this dotted submodule of the built model instead of the whole model (e.g. a detection
    # model's traceable "backbone.body"); weights still load into the whole model.
    submodule: str = ""
    # Leading non-patch tokens (CLS, registers) of NLC outputs; -1: read from the module (timm's
    # num_prefix_tokens; else 1 for a class_token/cls_token plus DINOv2's num_register_tokens).
    prefix_tokens: int = -1
    # Feature-map nodes the Compare RPC uses when a request names none (VGG16 defaults to
    # relu1_2..relu5_3 = features.3, 8, 15, 22, 29; other models need this or request nodes).
    compare_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeadConfig:
    """A named post-processing head (centering / PCA / whitening) that requests pick by name."""

    name: str
    # The .npz written by `layertap fit-whitening` (relative paths: from the config file).
    file: str
    # The model it may be used with ("" = any; checked against the file's own model).
    model: str = ""


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
class Settings:
    """Server settings. Tests build Settings(...) directly."""

    host: str = "127.0.0.1"
    port: int = 50051
    config: str | None = None
    device: str = "auto"
    devices: tuple[str, ...] = ()
    max_batch_size: int = 0
    preferred_batch_size: int = 4
    max_wait_ms: float = 2.0
    low_priority_max_wait_ms: float = 1000.0
    companion_wait_ms: float = 30.0
    share_forwards: bool = True
    share_across_depths: bool = False
    gpu_decode: str = "auto"
    max_queue_images: int = 512
    max_images_per_request: int = 64
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 40_000_000
    max_message_bytes: int = 64 * MiB
    max_concurrent_rpcs: int = 1024
    max_stream_in_flight: int = 64
    max_parameter_bytes: int = 32 * MiB
    keep_freed_memory: bool = True
    decode_threads: int = 2
    extractor_cache_size: int = 32
    torch_threads: int = 0
    shutdown_grace_s: float = 10.0
    shutdown_delay_s: float = 1.0
    log_level: str = "INFO"
    log_format: str = "json"
    metrics: bool = True
    metrics_host: str = ""
    metrics_port: int = 9464
    reflection: bool = True
    warmup: bool = True
    max_connection_age_s: float = 0.0
    max_connection_age_grace_s: float = 10.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_tokens: str = ""
    auth_tokens_file: str = ""
    auth_open_health: bool = True
    models: tuple[ModelConfig, ...] = ()
    # [[heads]] in the config file (TOML only, like [[models]]); loaded at start-up.
    heads: tuple[HeadConfig, ...] = ()

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def tokens(self) -> frozenset[str]:
        """Every accepted bearer token (from auth_tokens and auth_tokens_file)."""
        tokens = {t.strip() for t in self.auth_tokens.split(",")}
        if self.auth_tokens_file:
            text = Path(self.auth_tokens_file).expanduser().read_text()
            tokens |= {line.strip() for line in text.splitlines()}
        return frozenset(t for t in tokens if t and not t.startswith("#"))

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


# name -> why. The order is the order of --help.
FIELDS: dict[str, str] = {
    "host": "interface to bind; 0.0.0.0 to serve other machines (127.0.0.1 keeps it local)",
    "port": "gRPC port; 0 picks a free one",
    "config": "TOML file with [server] settings and [[models]]; empty uses the embedded default",
    "device": "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'",
    "devices": "comma-separated devices, one worker thread and model copy each (e.g. "
    "cuda:0,cuda:1); requests go to the least loaded; empty: just 'device'",
    "max_batch_size": "most images stacked into one forward; 0: the measured default of the "
    "device, 4 on CPU (bench/batch_sizes.py and bench/compare.py: batch 4 is fastest per image, "
    "8 and 16 slower) and 32 on CUDA (not measured here)",
    "preferred_batch_size": "while the worker is busy, a batch stops waiting once it holds this "
    "many images (Triton's preferred size; CPU-measured best 4); 0: wait for a full batch",
    "max_wait_ms": "how long a batch stays open for more images once the worker is busy",
    "low_priority_max_wait_ms": "after this wait a PRIORITY_LOW image counts as normal, so bulk "
    "work is never starved by interactive traffic",
    "companion_wait_ms": "after a batch of several images, the next batch of the same model "
    "and nodes waits at most this long (and at most 0.3 of that batch's run time) for those "
    "clients' next requests, so closed-loop clients keep sharing forwards; 0: off (a request "
    "after a batch of one never waits)",
    "share_forwards": "one forward serves the node sets of a model's requests in a batch (the "
    "union) when they end at the same deepest node; off batches only requests with equal node "
    "sets (for comparison benchmarks)",
    "share_across_depths": "with share_forwards, also let shallow node sets ride a deeper "
    "forward (one forward per batch whatever the depths): fewer, bigger forwards, which can pay "
    "where per-forward cost dominates (GPU, small batches); on CPU measured slower",
    "gpu_decode": "decode JPEGs with nvJPEG on the CUDA device (auto: when serving on CUDA; on: "
    "the same; off: CPU decode); a no-op on CPU",
    "max_queue_images": "images waiting for the worker before requests get RESOURCE_EXHAUSTED",
    "max_images_per_request": "images one Extract call may carry",
    "max_image_bytes": "encoded bytes one image may have",
    "max_image_pixels": "width x height one image may have (checked from the header, pre-decode)",
    "max_message_bytes": "gRPC send/receive message limit, both directions",
    "max_concurrent_rpcs": "RPCs served at once; more get RESOURCE_EXHAUSTED from gRPC (bounds "
    "memory when clients do not wait)",
    "max_stream_in_flight": "unanswered items the server holds per ExtractStream; it reads no "
    "more until one is answered, so gRPC flow control pushes back on the client",
    "max_parameter_bytes": "largest GetParameters answer in tensor bytes; at most "
    "max_message_bytes - 1 MiB (default: 32 MiB, or that bound when it is lower)",
    "keep_freed_memory": "glibc malloc keeps freed activation memory for the next forward "
    "instead of returning it to the OS and page-faulting it back every batch (CPU forwards "
    "about 1.5x faster at batch 4 measured; the process keeps its high-water mark)",
    "decode_threads": "threads that decode and preprocess images (off the event loop)",
    "extractor_cache_size": "FX graph modules kept per model (LRU); they share the weights",
    "torch_threads": "torch intra-op threads per worker; 0: the usable cores split between "
    "the CPU workers (at least 1; the decode threads are not subtracted)",
    "shutdown_grace_s": "seconds in-flight requests get to finish on SIGTERM",
    "shutdown_delay_s": "on SIGTERM, seconds health says NOT_SERVING while still serving, so "
    "probes and load balancers see it before the port closes",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "json (one object per line, for log pipelines) or text",
    "metrics": "serve Prometheus metrics over HTTP",
    "metrics_host": "interface for /metrics; empty uses host",
    "metrics_port": "HTTP port for /metrics; 0 picks a free one",
    "reflection": "gRPC server reflection (grpcurl and friends list and describe services)",
    "warmup": "run one real forward per model before health says SERVING",
    "max_connection_age_s": "close connections after this age so clients re-resolve; 0 = never",
    "max_connection_age_grace_s": "time in-flight RPCs get when a connection is aged out",
    "tls_cert": "PEM server certificate; with tls_key enables TLS (plaintext otherwise)",
    "tls_key": "PEM private key of tls_cert",
    "tls_client_ca": "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)",
    "auth_tokens": "comma-separated bearer tokens clients must send (secret; empty: no auth)",
    "auth_tokens_file": "file with one bearer token per line (secret), added to auth_tokens",
    "auth_open_health": "leave health and reflection open without a token (for probes)",
}

SECRETS = ("auth_tokens",)


_SERVER_TYPES = {k: v for k, v in get_type_hints(Settings).items() if k in FIELDS}


def _coerce(name: str, value: Any) -> Any:
    """Convert a string (env/CLI) or TOML value to the field's type."""
    default = getattr(Settings(), name)
    kind = type(default) if default is not None else str
    if name == "config":
        return str(value) if value not in (None, "") else None
    if kind is tuple:  # a TOML list, or a comma-separated string from env/CLI
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"setting {name!r}: expected a list of strings, got {value!r}")
        return tuple(str(v).strip() for v in items if str(v).strip())
    try:
        if kind is bool:
            if isinstance(value, str):
                word = value.strip().lower()
                if word in ("1", "true", "yes", "on"):
                    return True
                if word in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(word)
            return bool(value)
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: cannot read {value!r} as {kind.__name__}") from exc


def _validate(s: Settings) -> None:
    positive = (
        "max_queue_images",
        "max_images_per_request",
        "max_image_bytes",
        "max_image_pixels",
        "max_message_bytes",
        "max_concurrent_rpcs",
        "max_stream_in_flight",
        "max_parameter_bytes",
        "decode_threads",
        "extractor_cache_size",
    )
    for name in positive:
        if getattr(s, name) <= 0:
            raise ConfigError(f"setting {name!r} must be > 0, got {getattr(s, name)}")
    if s.shutdown_delay_s < 0 or s.shutdown_grace_s < 0:
        raise ConfigError("shutdown_delay_s and shutdown_grace_s must be >= 0")
    if s.max_batch_size < 0:
        raise ConfigError(f"setting 'max_batch_size' must be >= 0, got {s.max_batch_size}")
    if s.max_wait_ms < 0 or s.torch_threads < 0 or not 0 <= s.port <= 65535:
        raise ConfigError("max_wait_ms and torch_threads must be >= 0 and port in 0..65535")
    if s.preferred_batch_size < 0 or s.low_priority_max_wait_ms < 0 or s.companion_wait_ms < 0:
        raise ConfigError(
            "preferred_batch_size, low_priority_max_wait_ms and companion_wait_ms must be >= 0"
        )
    if s.gpu_decode not in ("auto", "on", "off"):
        raise ConfigError(f"gpu_decode must be 'auto', 'on' or 'off', got {s.gpu_decode!r}")
    for model in s.models:
        _validate_model(model)
    if not 0 <= s.metrics_port <= 65535:
        raise ConfigError(f"metrics_port must be in 0..65535, got {s.metrics_port}")
    if s.log_format not in ("json", "text"):
        raise ConfigError(f"log_format must be 'json' or 'text', got {s.log_format!r}")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("tls_cert and tls_key go together: set both or neither")
    if s.tls_client_ca and not s.tls_cert:
        raise ConfigError("tls_client_ca (mTLS) needs tls_cert and tls_key")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file"):
        path = getattr(s, name)
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"{name}: {path} is not a readable file")
    if s.max_parameter_bytes > s.max_message_bytes - PARAMETER_HEADROOM:
        raise ConfigError(
            f"max_parameter_bytes={s.max_parameter_bytes} must be at most max_message_bytes - "
            f"1 MiB = {s.max_message_bytes - PARAMETER_HEADROOM} (a GetParameters answer is one "
            "message); lower max_parameter_bytes or raise max_message_bytes"
        )
    names = [m.name for m in s.models]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"model names must be unique; repeated: {sorted(dupes)}")
    head_names = [h.name for h in s.heads]
    dupes = {n for n in head_names if head_names.count(n) > 1}
    if dupes:
        raise ConfigError(f"head names must be unique; repeated: {sorted(dupes)}")
    for head in s.heads:
        if not head.name or not head.file:
            raise ConfigError(f"every [[heads]] entry needs a 'name' and a 'file', got {head}")
        if head.model and head.model not in names:
            raise ConfigError(
                f"head {head.name!r} is bound to model {head.model!r}, which is not configured "
                f"(models: {', '.join(names) or 'none'}); fix its 'model' or leave it empty"
            )


AUTOCAST_DTYPES = ("", "float16", "bfloat16")
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune")


EXTRACTION_MODES = ("auto", "fx", "hooks")
RESIZE_KERNELS = ("uint8", "float")  # preprocess.Preprocessing.resize_kernel


def _validate_model(m: ModelConfig) -> None:
    """Per-model engine options; device-dependent checks (float16 on CPU) happen at load."""
    where = f"model {m.name!r}"
    if m.extraction not in EXTRACTION_MODES:
        raise ConfigError(
            f"{where}: extraction must be one of {EXTRACTION_MODES}, got {m.extraction!r}"
        )
    if not isinstance(m.prefix_tokens, int) or m.prefix_tokens < -1:
        raise ConfigError(
            f"{where}: prefix_tokens must be >= 0, or -1 (auto); got {m.prefix_tokens}"
        )
    parts = m.submodule.split(".") if isinstance(m.submodule, str) else [""]
    if m.submodule and any(not (p.isidentifier() or p.isdigit()) for p in parts):
        raise ConfigError(
            f"{where}: submodule must be a dotted module path such as 'backbone.body', "
            f"got {m.submodule!r}"
        )
    if m.resize_kernel not in RESIZE_KERNELS:
        raise ConfigError(
            f"{where}: resize_kernel must be one of {RESIZE_KERNELS}, got {m.resize_kernel!r}"
        )
    if m.autocast not in AUTOCAST_DTYPES:
        raise ConfigError(f"{where}: autocast must be one of {AUTOCAST_DTYPES}, got {m.autocast!r}")
    if m.compile not in COMPILE_MODES:
        raise ConfigError(f"{where}: compile must be one of {COMPILE_MODES}, got {m.compile!r}")
    if not m.warmup_batch_sizes or any(b < 1 for b in m.warmup_batch_sizes):
        raise ConfigError(f"{where}: warmup_batch_sizes must be a non-empty list of sizes >= 1")
    if any(not nodes for nodes in m.warmup_nodes):
        raise ConfigError(f"{where}: every warmup_nodes entry must name at least one node")
    if (m.max_wait_ms is not None and m.max_wait_ms < 0) or (m.preferred_batch_size or 0) < 0:
        raise ConfigError(f"{where}: max_wait_ms and preferred_batch_size must be >= 0")


# The declared type of every key a config table may hold (config_types checks values against
# them); a warmup_nodes entry may also be a bare node name, a set of one.
_MODEL_TYPES = get_type_hints(ModelConfig) | {"warmup_nodes": tuple[str | tuple[str, ...], ...]}
_HEAD_TYPES = get_type_hints(HeadConfig)


def parse_head(entry: Mapping[str, Any], base_dir: Path | None = None) -> HeadConfig:
    """One [[heads]] table -> HeadConfig, the file made absolute (relative to the config)."""
    check_table(f"head entry {entry.get('name', '?')!r}", entry, _HEAD_TYPES)
    if not entry.get("name") or not entry.get("file"):
        raise ConfigError("every [[heads]] entry needs a 'name' and a 'file' (.npz)")
    path = Path(str(entry["file"])).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = (base_dir / path).resolve()
    return HeadConfig(name=str(entry["name"]), file=str(path), model=str(entry.get("model", "")))


def parse_model(entry: Mapping[str, Any], base_dir: Path | None = None) -> ModelConfig:
    """One [[models]] table → ModelConfig, with relative weight paths made absolute."""
    check_table(f"model entry {entry.get('name', '?')!r}", entry, _MODEL_TYPES)
    if not entry.get("name"):
        raise ConfigError("every [[models]] entry needs a 'name'")
    values = dict(entry)
    if bool(values.get("arch")) == bool(values.get("factory")):
        raise ConfigError(f"model {values['name']!r}: give exactly one of 'arch' or 'factory'")
    for key in ("input_size", "mean", "std", "leaf_modules", "autowrap_functions"):
        if key in values and values[key] is not None:
            values[key] = tuple(values[key])
    if isinstance(values.get("compare_nodes"), (list, tuple)):
        values["compare_nodes"] = tuple(str(n) for n in values["compare_nodes"])
    elif "compare_nodes" in values:
        raise ConfigError(f"model {values['name']!r}: compare_nodes must be a list of node names")
    if "warmup_batch_sizes" in values:
        values["warmup_batch_sizes"] = tuple(int(b) for b in values["warmup_batch_sizes"])
    if "warmup_nodes" in values:  # a list of node lists; a bare string is one single-node set
        values["warmup_nodes"] = tuple(
            (group,) if isinstance(group, str) else tuple(group) for group in values["warmup_nodes"]
        )
    if isinstance(values.get("input_size"), tuple) and len(values["input_size"]) == 1:
        values["input_size"] = (values["input_size"][0], values["input_size"][0])
    factory = values.get("factory")
    if base_dir is not None and isinstance(factory, str) and ".py:" in factory:
        # a factory in a Python file next to the config ("model.py:build"): made absolute
        file, _, attr = factory.rpartition(":")
        path = Path(file).expanduser()
        values["factory"] = f"{path if path.is_absolute() else (base_dir / path).resolve()}:{attr}"
    weights = str(values.get("weights", "DEFAULT"))
    if base_dir is not None and weights.endswith((".safetensors", ".pth", ".pt", ".bin")):
        path = Path(weights).expanduser()
        values["weights"] = str(path if path.is_absolute() else (base_dir / path).resolve())
    return ModelConfig(**values)


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
    from_env = {
        name: env[ENV_PREFIX + name.upper()] for name in FIELDS if ENV_PREFIX + name.upper() in env
    }
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
    _validate(settings)
    return settings


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layertap serve",
        description="Serve intermediate layers of vision models over gRPC.",
        epilog=f"Every flag also reads {ENV_PREFIX}<NAME> (e.g. {ENV_PREFIX}PORT).",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings (secrets redacted) as JSON and exit",
    )
    defaults = Settings()
    for name, why in FIELDS.items():
        default = getattr(defaults, name)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"{why} (default: {default}; env {ENV_PREFIX}{name.upper()})",
        )
    return parser
