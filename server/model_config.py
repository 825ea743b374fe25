"""The [[models]] and [[heads]] entries of the config file: their declared keys, parsed and checked.

Each key is declared once on its dataclass field with its default, one-line help and allowed
range or words (config_types.setting), so the docs and the checks read the same place.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .config_types import ConfigError, about, check_ranges, check_table, setting

AUTOCAST_DTYPES = ("", "float16", "bfloat16")
COMPILE_MODES = ("auto", "", "default", "reduce-overhead", "max-autotune")
EXTRACTION_MODES = ("auto", "fx", "hooks")
# Where a model comes from (server/sources/, one module each) and the config key naming it.
SOURCES = ("torchvision", "factory", "timm", "huggingface", "export")
SOURCE_KEY = {
    "torchvision": "arch",
    "factory": "factory",
    "timm": "arch",
    "huggingface": "path",
    "export": "path",
}
# The optional package each source needs, and the extra that installs it.
SOURCE_PACKAGES = {"timm": ("timm", "timm"), "huggingface": ("transformers", "hf")}
RESIZE_MODES = ("", "shorter", "squash")  # preprocess.Preprocessing.resize_mode
RESIZE_KERNELS = ("uint8", "float")  # preprocess.Preprocessing.resize_kernel


@dataclass(frozen=True)
class ModelConfig:
    """One servable model. Only names listed here are reachable by clients."""

    name: str = field(metadata=about("what clients send (only configured names are reachable)"))
    source: str = setting(
        "",
        'where the model comes from: "torchvision" (arch), "factory", "timm" (arch), '
        '"huggingface" (path) or "export" (path); unset: torchvision, or factory with factory',
        choices=("", *SOURCES),
    )
    arch: str | None = setting(
        None,
        "a torchvision classification architecture (torchvision.models.list_models()), or "
        "with source = timm a timm.list_models() name",
    )
    factory: str | None = setting(
        None, 'or "package.module:callable" returning an nn.Module (custom, timm, face models)'
    )
    path: str | None = setting(
        None,
        "huggingface: a save_pretrained() directory; export: a .pt2 file from torch.export.save "
        "(relative: to the config file)",
    )
    kwargs: Mapping[str, Any] = field(
        default_factory=dict, metadata=about("keyword arguments of arch or factory")
    )
    weights: str = setting(
        "DEFAULT",
        'torchvision weights enum name ("DEFAULT", "IMAGENET1K_V1", '
        '"ResNet50_Weights.IMAGENET1K_V2"), a local .safetensors/.pth/.pt file, or "none"',
    )
    allow_random: bool = setting(
        False, 'serve random init when the weights are "none" or not cached (never downloads)'
    )
    input_size: tuple[int, int] | None = setting(
        None, "model input (H, W); default: the weights' own transforms"
    )
    resize_size: int | None = setting(None, "shorter side resized to this before the crop")
    resize_mode: str = setting(
        "",
        '"shorter" (resize the shorter side, keep the aspect) or "squash" (resize to the '
        "crop's shape); unset: the model's own",
        choices=RESIZE_MODES,
    )
    mean: tuple[float, float, float] | None = setting(None, "per-channel normalisation mean")
    std: tuple[float, float, float] | None = setting(None, "per-channel normalisation std")
    interpolation: str | None = setting(None, '"bilinear", "bicubic" or "nearest"')
    resize_kernel: str = setting(
        "uint8",
        "resize kernel for uint8 images: \"uint8\" (torchvision v2's native kernel, Pillow's "
        'resampling, ~6x cheaper on CPU) or "float" (bit-exact with weights.transforms())',
        choices=RESIZE_KERNELS,
    )
    leaf_modules: tuple[str, ...] = setting(
        (), 'torch.fx: module classes kept as leaves, each "package.module:Name"'
    )
    autowrap_functions: tuple[str, ...] = setting(
        (), 'torch.fx: functions kept opaque, each "package.module:Name"'
    )
    # >= 0: batch_limit reads a negative as "unset", which would hide a typo
    max_batch_size: int = setting(
        0, "largest batch for this model (0: the server's max_batch_size)", minimum=0
    )
    max_wait_ms: float | None = setting(
        None, "batching override for this model (unset: the server's max_wait_ms)", minimum=0
    )
    preferred_batch_size: int | None = setting(
        None, "batching override (unset: the server's preferred_batch_size)", minimum=0
    )
    warmup_nodes: tuple[tuple[str, ...], ...] = setting(
        (),
        "node sets built and run on a zero batch per warmup_batch_sizes entry at load, before "
        "the model reports ready, so their first request neither traces nor compiles",
    )
    warmup_batch_sizes: tuple[int, ...] = setting((1,), "batch sizes each warmup set runs at")
    channels_last: bool | None = setting(
        None,
        "channels_last weights and batches; unset: on the CPU chosen at load by timing both "
        "layouts (kept when >= 10 % faster; not timed with warmup off or under 20 ms), else off",
    )
    fold_batchnorm: bool = setting(
        True,
        "fold eval-mode BatchNorms into the convolution before them unless that convolution's "
        "output is requested (server/fusion.py): same values to float32 rounding, faster on CPU",
    )
    autocast: str = setting(
        "",
        'forward under torch.autocast: "" (float32), "bfloat16" (CPU or CUDA) or "float16" '
        "(CUDA only); outputs still come back in the requested dtype",
        choices=AUTOCAST_DTYPES,
    )
    compile: str = setting(
        "auto",
        '"auto": compiled with inductor where a timing at load shows >= 10 % gain (static '
        'shapes, every batch size; server/auto_compile.py), else eager; "" (off); or '
        '"default", "reduce-overhead", "max-autotune": torch.compile each extractor lazily on '
        "the worker",
        choices=COMPILE_MODES,
    )
    compile_backend: str = setting(
        "inductor", 'torch.compile backend; "inductor" needs a C++ compiler (and Triton on CUDA)'
    )
    extraction: str = setting(
        "auto",
        'how nodes are found: "fx" (graph nodes; a trace failure stops the load), "hooks" '
        '(forward hooks on named modules) or "auto" (fx, falling back to hooks)',
        choices=EXTRACTION_MODES,
    )
    submodule: str = setting(
        "",
        'serve this dotted submodule of the built model (e.g. "backbone.body"); weights still '
        "load into the whole model",
    )
    prefix_tokens: int = setting(
        -1,
        "leading non-patch tokens (CLS, registers) of NLC outputs; -1: read from the module "
        "(timm's num_prefix_tokens; else class/cls token plus DINOv2's register tokens)",
    )
    compare_nodes: tuple[str, ...] = setting(
        (),
        "feature-map nodes Compare uses when a request names none (VGG16: relu1_2..relu5_3 = "
        "features.3, 8, 15, 22, 29; other models need this or request nodes)",
    )

    def __post_init__(self) -> None:
        # unset: as the keys say (entries built in code, like parsed ones)
        if not self.source:
            object.__setattr__(self, "source", "factory" if self.factory else "torchvision")

    @property
    def explicit_compile(self) -> bool:
        """An explicit torch.compile mode ("default", "reduce-overhead", "max-autotune"):
        compiled lazily on the worker. "auto" is decided at load (server/auto_compile.py)."""
        return self.compile not in ("", "auto")


@dataclass(frozen=True)
class HeadConfig:
    """A named post-processing head (centering / PCA / whitening) that requests pick by name."""

    name: str = field(metadata=about('what requests send ("whiten:NAME")'))
    file: str = field(
        metadata=about("the .npz written by `layertap fit-whitening` (relative: to the config)")
    )
    model: str = setting("", "the model it may be used with (empty: any; checked at load)")


def validate_model(m: ModelConfig) -> None:
    """Per-model engine options; device-dependent checks (float16 on CPU) happen at load."""
    where = f"model {m.name!r}"
    check_ranges(where + ": {}", m)
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
    if not m.warmup_batch_sizes or any(b < 1 for b in m.warmup_batch_sizes):
        raise ConfigError(f"{where}: warmup_batch_sizes must be a non-empty list of sizes >= 1")
    if any(not nodes for nodes in m.warmup_nodes):
        raise ConfigError(f"{where}: every warmup_nodes entry must name at least one node")


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


def _source(values: Mapping[str, Any]) -> str:
    """The entry's source, checked against the keys it gives: each source needs its own key
    (SOURCE_KEY) and no other source's, and an optional package that is installed."""
    name = values["name"]
    given = [k for k in ("arch", "factory", "path") if values.get(k)]
    if not values.get("source") and given not in (["arch"], ["factory"]):
        raise ConfigError(
            f"model {name!r}: give exactly one of 'arch' or 'factory' (or source = "
            "'huggingface' or 'export' with a 'path'; source = 'timm' with a timm 'arch')"
        )
    source = str(values.get("source") or ("factory" if values.get("factory") else "torchvision"))
    if source not in SOURCES:
        raise ConfigError(
            f"model {name!r}: source must be one of {', '.join(SOURCES)}, got {source!r}"
        )
    needed = SOURCE_KEY[source]
    if not values.get(needed):
        raise ConfigError(f"model {name!r}: source {source!r} needs '{needed}'")
    extra = sorted(set(given) - {needed})
    if extra:
        raise ConfigError(
            f"model {name!r}: source {source!r} takes '{needed}', not {', '.join(extra)}; "
            "give exactly one of arch (torchvision, timm), factory, or path (huggingface, export)"
        )
    if source in SOURCE_PACKAGES:
        package, extra_name = SOURCE_PACKAGES[source]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"model {name!r}: source {source!r} needs the {package} package, which is not "
                f"installed; pip install 'layertap[{extra_name}]'"
            )
    return source


def parse_model(entry: Mapping[str, Any], base_dir: Path | None = None) -> ModelConfig:
    """One [[models]] table → ModelConfig, with relative weight paths made absolute."""
    check_table(f"model entry {entry.get('name', '?')!r}", entry, _MODEL_TYPES)
    if not entry.get("name"):
        raise ConfigError("every [[models]] entry needs a 'name'")
    values = dict(entry)
    values["source"] = _source(values)
    if isinstance(values.get("path"), str):
        values["path"] = _beside(values["path"], base_dir)
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
        values["factory"] = f"{_beside(file, base_dir)}:{attr}"
    weights = str(values.get("weights", "DEFAULT"))
    if weights.endswith((".safetensors", ".pth", ".pt", ".bin")):
        values["weights"] = _beside(weights, base_dir)
    return ModelConfig(**values)


def _beside(file: str, base_dir: Path | None) -> str:
    """A path from the config file: relative ones are relative to the config's directory."""
    path = Path(file).expanduser()
    if base_dir is None or path.is_absolute():
        return str(path) if base_dir is not None else file
    return str((base_dir / path).resolve())
