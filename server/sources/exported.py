"""Exported programs: a .pt2 file written by torch.export.save, served as the module hierarchy it
was exported from, so node names are the original module paths (`layer3.0.conv1`, `features.22`).

Reading: the archive is checked before torch.export.load sees it (a zip from torch.export.save,
written by this torch release, no pickled Python objects, no AOTInductor native code), then
loaded with every torch.load inside forced to weights_only. The weights live in the file, so
`weights` stays at its default; weights_sha256 is the file's sha256.

Serving: torch.export.unflatten rebuilds one module per original module call. Modules whose
original class is a torch.nn one (Conv2d, BatchNorm2d, ReLU, Linear, LayerNorm ...) are fx
leaves, as torchvision's NodePathTracer keeps them in an eager model, so the catalogue's names are
the ones create_feature_extractor gives the eager model; ops between modules are aten nodes
(`layer1.0.add__tensor`). The server batches images, so the program's batch dimension must be
dynamic (torch.export.Dim on dim 0).

Preprocessing: a program carries no description, so it is the ImageNet one (resize 256, crop
224, bilinear, ImageNet mean/std), its size taken from the program when H and W were exported
static, then the entry's keys (models.apply_overrides).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.export.pt2_archive import constants as pt2
from torch.export.unflatten import InterpreterModule, UnflattenedModule

from ..model_config import ModelConfig
from ..models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedWeights,
    ModelLoadError,
    _torch_reason,
    apply_overrides,
    built,
    sha256_file,
)
from ..preprocess import Preprocessing
from ..trace_gate import tracing

_RATIO = 256 / 224  # resize-to-crop ratio of the ImageNet default
_EXPORT_HINT = (
    "torch.export.save(torch.export.export(model.eval(), (torch.randn(2, 3, H, W),), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2')"
)
# fake-tensor metadata the export left on graph nodes: not needed to run, and it cannot be
# deep-copied (several devices each get a copy of the module)
_FAKE_META = ("val", "example_value", "unbacked_bindings", "tensor_meta")


class ExportedModule(UnflattenedModule):
    """The unflattened program, called with one image batch like the eager model."""

    def forward(self, x: torch.Tensor) -> Any:  # one named input, so torch.fx can trace it
        return super().forward(x)


class ExportedLeaf(InterpreterModule):
    """A call of a torch.nn module (Conv2d, ReLU ...) in the program: one node, as in eager."""


_CLASSES: dict[tuple[type, str], type] = {}
_CALL_INDEX = re.compile(r"@\d+")  # unflatten's name for a module's second and later calls


def _named_class(base: type, original: str) -> type:
    """A subclass of `base` named after the module's original class ("Conv2d", "BasicBlock"),
    so DescribeModel's types and node targets read as the eager model's."""
    name = original.rsplit(".", 1)[-1] or base.__name__
    key = (base, name)
    if key not in _CLASSES:
        _CLASSES[key] = type(name, (base,), {"__module__": __name__, "__qualname__": name})
    return _CLASSES[key]


def _is_leaf(original: str) -> bool:
    """NodePathTracer's rule on the original class: torch.nn modules except containers."""
    return original.startswith(("torch.nn.", "torch.ao.nn.")) and not original.startswith(
        "torch.nn.modules.container."
    )


def _original_classes(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """Module path -> qualified class name of the module each op was called from."""
    classes: dict[str, str] = {}
    for node in ep.graph.nodes:
        for path, cls in node.meta.get("nn_module_stack", {}).values():
            classes.setdefault(_CALL_INDEX.sub("", str(path)), str(cls))
    return classes


def served_module(ep: torch.export.ExportedProgram) -> ExportedModule:
    """The program as its module hierarchy (torch.export.unflatten), ready to trace and copy."""
    classes = _original_classes(ep)
    module = torch.export.unflatten(ep)
    for name, sub in module.named_modules():
        graph = getattr(sub, "graph", None)
        if isinstance(graph, fx.Graph):
            for node in graph.nodes:
                for key in _FAKE_META:
                    node.meta.pop(key, None)
        original = classes.get(_CALL_INDEX.sub("", name), "")
        if sub is module:
            sub.__class__ = _named_class(ExportedModule, original)
        elif type(sub) is InterpreterModule:
            base = ExportedLeaf if _is_leaf(original) else InterpreterModule
            sub.__class__ = _named_class(base, original)
        for attr, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                # a tensor constant the program lifted (unflatten sets it as a plain
                # attribute): a buffer, so .to(device) and channels-last move it with the rest
                delattr(sub, attr)
                sub.register_buffer(attr, value, persistent=False)
        if isinstance(sub, (InterpreterModule, UnflattenedModule)):
            # generated code instead of an fx.Interpreter per call; regenerated because
            # unflatten's deduplication renamed calls (`relu@1` -> `relu`) after the first one
            sub._run_with_interpreter = False
            sub.finalize()
    # the export's own input checks read fake tensors; _input_spec checked the input instead
    module.meta = {}
    module.input_placeholders = []
    module.check_input_constraints = False
    assert isinstance(module, ExportedModule)
    return module


def _version(text: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _check_archive(cfg: ModelConfig, path: str) -> str:
    """Refuse what torch.export.load should not read here, before it reads anything; returns
    the torch version that wrote the file."""
    where = f"model {cfg.name!r}: {path}"
    if not os.path.isfile(path):
        raise ModelLoadError(f"{where} does not exist (source = 'export' needs a .pt2 file)")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"{where} is not a .pt2 archive (not a zip file); write one with {_EXPORT_HINT}"
        )
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/", 1)[0] + "/" if names else ""
        program = root + pt2.MODELS_FILENAME_FORMAT.format("model")
        if any(n.startswith(root + pt2.AOTINDUCTOR_DIR) for n in names):
            raise ModelLoadError(
                f"{where} holds AOTInductor compiled code (native libraries torch.export.load "
                "would load); save the exported program alone with torch.export.save"
            )
        if any(n.endswith("serialized_exported_program.json") for n in names):
            raise ModelLoadError(
                f"{where} is an exported program in the format of torch 2.6 or older; re-export "
                f"the model with torch {torch.__version__} (torch.export.export, then "
                "torch.export.save)"
            )
        if root + pt2.ARCHIVE_FORMAT_PATH not in names or program not in names:
            kind = (
                "a torch.save checkpoint or TorchScript file"
                if any(n.endswith("data.pkl") for n in names)
                else "not an archive written by torch.export.save"
            )
            raise ModelLoadError(
                f"{where} holds no exported program ({kind}); write one with {_EXPORT_HINT}, or "
                "serve a checkpoint through a torchvision, timm or factory entry's `weights`"
            )
        pickled = [
            n
            for n in names
            if n.startswith(root + pt2.CONSTANTS_DIR)
            and os.path.basename(n).startswith(
                (pt2.CUSTOM_OBJ_FILENAME_PREFIX, pt2.OPAQUE_OBJ_FILENAME_PREFIX)
            )
        ]
        if pickled:
            raise ModelLoadError(
                f"{where} holds pickled Python objects ({', '.join(pickled[:3])}: script or "
                "opaque objects), which are never unpickled here; export a model whose "
                "constants are tensors"
            )
        try:
            meta = json.loads(archive.read(program))
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{where}: its program is unreadable ({exc})") from exc
    written = str(meta.get("torch_version") or "")
    schema = meta.get("schema_version") or {}
    ours = torch.__version__
    if _version(written) != _version(ours):
        wrote = f"torch {written}" if written else f"a torch with export schema {schema}"
        raise ModelLoadError(
            f"{where} was written by {wrote} (schema {schema.get('major')}."
            f"{schema.get('minor')}); this server runs torch {ours}, and exported programs are "
            f"not portable across torch releases: re-export the model with torch {ours} "
            "(torch.export.export, then torch.export.save)"
        )
    return written


def _load(cfg: ModelConfig, path: str) -> torch.export.ExportedProgram:
    # every torch.load inside torch.export.load (weights, sample inputs) stays weights_only,
    # even its fallbacks (as the torchvision source does for torchvision's own loader)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with tracing():  # fake tensors while deserialising: not beside a trace or a forward
            return torch.export.load(path)
    except Exception as exc:  # torch raises many types for a damaged or foreign archive
        if type(exc).__name__ == "UnpicklingError":  # weights_only refused a non-tensor
            raise ModelLoadError(
                f"model {cfg.name!r}: torch.export.load cannot read {path}: it holds pickled "
                f"objects that are not tensors, which are never unpickled here "
                f"({_torch_reason(exc)})"
            ) from exc
        raise ModelLoadError(
            f"model {cfg.name!r}: torch.export.load cannot read {path}: {_torch_reason(exc)}"
        ) from exc


@dataclass(frozen=True)
class _Input:
    """The program's image input: H and W as the lowest and highest sizes it was exported for
    (equal when static; unbounded for a dimension derived from another, which is not checked)."""

    height: tuple[float, float]
    width: tuple[float, float]

    @property
    def static(self) -> tuple[int, int] | None:
        (h0, h1), (w0, w1) = self.height, self.width
        return (int(h0), int(w0)) if h0 == h1 and w0 == w1 else None


def _bounds(ep: torch.export.ExportedProgram, dim: int | torch.SymInt) -> tuple[float, float]:
    if isinstance(dim, int):
        return (dim, dim)
    bound = ep.range_constraints.get(dim.node.expr)
    if bound is None:
        return (-math.inf, math.inf)
    return (float(bound.lower), float(bound.upper))  # int_oo -> inf


def _input_spec(cfg: ModelConfig, ep: torch.export.ExportedProgram) -> _Input:
    """Check the program takes one float32 [N, 3, H, W] batch with a dynamic N that reaches the
    entry's batch sizes; its H and W bounds."""
    where = f"model {cfg.name!r}: {cfg.path}"
    user = list(ep.graph_signature.user_inputs)
    val = next(
        (n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user),
        None,
    )
    if len(user) != 1:
        raise ModelLoadError(
            f"{where}: the program takes {len(user)} inputs ({', '.join(map(str, user))}); "
            "layertap serves programs of one image batch [N, 3, H, W]"
        )
    if not isinstance(val, torch.Tensor):
        raise ModelLoadError(f"{where}: the program's input has no tensor shape recorded")
    shape = list(val.shape)
    if len(shape) != 4 or shape[1] != 3 or val.dtype != torch.float32:
        raise ModelLoadError(
            f"{where}: the program's input is {val.dtype} {shape}, not a float32 "
            "[N, 3, H, W] image batch"
        )
    if not isinstance(shape[0], torch.SymInt):
        raise ModelLoadError(
            f"{where} was exported with a static batch of {shape[0]}; the server batches images "
            f"(warm-up, requests), so export with a dynamic batch dimension: {_EXPORT_HINT}"
        )
    needed = max(2, cfg.max_batch_size, *cfg.warmup_batch_sizes)  # 2: the catalogue's batch
    upper = _bounds(ep, shape[0])[1]
    if upper < needed:
        raise ModelLoadError(
            f"{where}: its batch dimension goes up to {int(upper)}, this entry runs batches of "
            f"{needed}; export with a larger Dim('batch', max=...) (or none), or lower "
            "max_batch_size / warmup_batch_sizes"
        )
    return _Input(_bounds(ep, shape[2]), _bounds(ep, shape[3]))


def _span(low: float, high: float) -> str:
    return f"{low:.0f} or more" if math.isinf(high) else f"{low:.0f} to {high:.0f}"


def _preprocessing(cfg: ModelConfig, spec: _Input) -> Preprocessing:
    """ImageNet's 256/224 at the program's static size (when it has one), then the entry's keys;
    a crop outside the sizes the program was exported for is refused."""
    static = spec.static
    crop = static or (224, 224)
    base = Preprocessing(
        resize_size=round(min(crop) * _RATIO),
        crop_size=crop,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    prep = apply_overrides(cfg, base, _RATIO)
    (h0, h1), (w0, w1) = spec.height, spec.width
    h, w = prep.crop_size
    if static is not None and (h, w) != static:
        raise ModelLoadError(
            f"model {cfg.name!r}: {cfg.path} was exported for {static[0]}x{static[1]} inputs "
            f"only; remove input_size = {[h, w]}, or export with dynamic H and W "
            "(dynamic_shapes=({0: Dim('batch'), 2: Dim('h'), 3: Dim('w')},))"
        )
    if not (h0 <= h <= h1 and w0 <= w <= w1):
        raise ModelLoadError(
            f"model {cfg.name!r}: {cfg.path} takes heights {_span(h0, h1)} and widths "
            f"{_span(w0, w1)}, not the {h}x{w} input of this entry; set input_size within "
            "them, or export with wider Dim ranges"
        )
    return prep


def build(cfg: ModelConfig) -> LoadedWeights:
    """The exported program at `path`, unflattened, on the CPU."""
    assert cfg.path is not None
    path = cfg.path
    if cfg.weights.upper() != "DEFAULT":
        raise ModelLoadError(
            f"model {cfg.name!r}: an exported program carries its own weights; remove "
            f"weights = {cfg.weights!r} (to serve other weights, export the model again)"
        )
    if cfg.kwargs:
        raise ModelLoadError(
            f"model {cfg.name!r}: kwargs do not apply to an exported program (its arguments "
            "were fixed when it was exported)"
        )
    written = _check_archive(cfg, path)
    ep = _load(cfg, path)
    spec = _input_spec(cfg, ep)
    module: nn.Module = served_module(ep)
    size = spec.static
    static = f"static {size[0]}x{size[1]} input" if size else "dynamic input size"
    note = (
        f"exported program (torch {written}, {static}) served as its module hierarchy "
        "(torch.export.unflatten): module-path node names"
    )
    prep = functools.partial(_preprocessing, spec=spec)
    return built(
        cfg,
        module,
        (os.path.basename(path), sha256_file(path)),
        False,
        note,
        prep,
        leaf_modules=(ExportedLeaf,),
    )
