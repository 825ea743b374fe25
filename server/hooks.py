"""Forward-hook extraction, for models torch.fx cannot trace.

Detection models at the top level and code with data-dependent control flow (``if x.sum() > 0``,
the DINOv2 reference implementation) refuse symbolic tracing. Their named modules still run, so
the nodes of such a model are its named modules whose output is a batch-dependent tensor, found
by ONE real forward at load on a zero batch at the model's input size; the order those outputs
were produced is the execution order. A request registers hooks on the wanted modules only, runs
the model once and stops it (a private exception raised from the last hook that was needed) as
soon as every wanted module has fired, so a shallow node costs a shallow forward.

Limits, by construction: module outputs only (no functional ops inside a forward); a module
whose output is a tuple, dict or list is not a node (ask for one of its submodules); a module
called several times in one forward (ResNet's shared ``relu``) gives its first call's output,
like the fx node of the same name. Everything runs on the worker thread; the hook state is local
to each call, so two extractors of one model never see each other's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .catalog import WIRE_DTYPES, Catalog, NodeSpec
from .errors import InvalidArgument
from .layouts import CHANNELS_FIRST
from .trace_gate import forwarding

__all__ = ["HookExtractor", "build_hook_catalog", "build_hook_extractor"]


class _Enough(BaseException):
    """Raised from a hook once every wanted module has fired: ends the forward early.

    A BaseException, like GeneratorExit: model code that wraps a call in ``except Exception``
    (a fused-kernel fallback, or a re-raise with more context) must not catch it, or the
    early stop would run the fallback path or fail the request. HookExtractor.forward always
    catches it, so it never leaves the extractor."""


def _kind(value: object) -> str:
    if isinstance(value, tuple):
        return "a tuple"
    if isinstance(value, dict):
        return "a dict"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


def _own_layout(module: nn.Module, shape: tuple[int, ...]) -> str | None:
    """The layout a module's class proves for its own 3-D or 4-D output, or None when it cannot
    tell (elementwise modules, containers: they inherit from what they returned). A 3-D output
    of a channels-first module (Conv1d, BatchNorm1d ...) is [N, C, L]: no layout the pools
    know ("", raw only), never NLC."""
    rank = len(shape)
    if isinstance(module, CHANNELS_FIRST):
        return "NCHW" if rank == 4 else ""
    channels_last = "NHWC" if rank == 4 else "NLC"
    last = shape[-1]
    if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (last,):
        return channels_last  # normalises the last dim: channels last (Swin stages, tokens)
    if isinstance(module, nn.Linear) and module.out_features == last:
        return channels_last
    if rank != 4:
        return None
    dims = getattr(module, "dims", None)  # torchvision.ops.misc.Permute
    if type(module).__name__ == "Permute" and isinstance(dims, (list, tuple)) and len(dims) == 4:
        if list(dims) == [0, 2, 3, 1]:
            return "NHWC"
        if list(dims) == [0, 3, 1, 2]:
            return "NCHW"
    return None


def build_hook_catalog(
    model: nn.Module,
    input_size: tuple[int, int],
    device: torch.device,
    reason: str,
    batch: int = 2,
) -> Catalog:
    """Discover the module nodes by one forward on a zero batch (batch 2, so outputs whose first
    dim is not the batch — detection boxes, proposals — are told apart and left out)."""
    model.eval()
    named = [(name, mod) for name, mod in model.named_modules() if name]
    records: list[tuple[str, nn.Module, torch.Tensor]] = []
    layouts: list[str] = []
    skipped: dict[str, str] = {}
    starts: dict[str, int] = {}
    inputs: dict[str, object] = {}
    done: set[str] = set()

    def pre(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if name not in starts:
                starts[name] = len(records)
                inputs[name] = args[0] if args else None

        return hook

    def post(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in done:  # a module called again: its first output is the node
                return
            done.add(name)
            if not isinstance(output, torch.Tensor):
                skipped[name] = f"outputs {_kind(output)}, not a tensor"
                return
            shape = tuple(int(d) for d in output.shape)
            if not shape or shape[0] != batch:
                skipped[name] = f"output {list(shape)} is not batch-first"
                return
            layout = _guess_layout(module, shape, name)
            records.append((name, module, output))
            layouts.append(layout)

        return hook

    def _guess_layout(module: nn.Module, shape: tuple[int, ...], name: str) -> str:
        rank = len(shape)
        if rank == 2:
            return "NC"
        if rank not in (3, 4):
            return ""
        own = _own_layout(module, shape)
        if own is not None:
            return own
        # an elementwise module keeps the layout of its input (when that is a node) ...
        source = inputs.get(name)
        for i in range(len(records) - 1, -1, -1):
            if records[i][2] is source and tuple(records[i][2].shape) == shape:
                return layouts[i]
        # ... a container that of the last same-shaped output produced inside it
        for i in range(len(records) - 1, starts.get(name, len(records)) - 1, -1):
            if tuple(records[i][2].shape) == shape:
                return layouts[i]
        return "NCHW" if rank == 4 else "NLC"

    handles = []
    for name, mod in named:
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post(name)))
    h, w = input_size
    try:
        with forwarding(), torch.inference_mode():
            model(torch.zeros(batch, 3, h, w, device=device))
    finally:
        for handle in handles:
            handle.remove()
    nodes = [
        NodeSpec(
            name=name,
            shape=(1, *tuple(int(d) for d in out.shape[1:])),
            dtype=WIRE_DTYPES.get(out.dtype, str(out.dtype).replace("torch.", "")),
            layout=layout,
            op="call_module",
            target=type(module).__name__,
        )
        for (name, module, out), layout in zip(records, layouts, strict=True)
    ]
    if not nodes:
        raise RuntimeError(
            f"no named module of {type(model).__name__} returns a batch-first tensor at input "
            f"{h}x{w}; nothing to serve through hooks"
        )
    if skipped:
        shown = ", ".join(list(skipped)[:4]) + (", ..." if len(skipped) > 4 else "")
        reason += (
            f"; module outputs only: {len(skipped)} modules that return a tuple, dict, list or a "
            f"tensor that is not batch-first are not nodes ({shown})"
        )
    return Catalog(
        root=model,
        graph=None,
        input_size=input_size,
        nodes=nodes,
        all_names=[name for name, _ in named],
        fx_nodes={},
        mode="hooks",
        reason=reason,
        skipped=skipped,
    )


class HookExtractor(nn.Module):
    """{module name: output} for a fixed set of modules, by one (early-stopped) forward.

    Same contract as the fx extractor: called with a batch, returns a dict of tensors keyed by
    full node name, each a clone taken when the module returned (a later in-place op such as
    ReLU(inplace=True) cannot change it)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model  # shared weights: a child, so .eval() reaches it
        self.names = tuple(dict.fromkeys(names))
        self._targets = [(name, model.get_submodule(name)) for name in self.names]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}  # local to this call: nothing shared between calls
        wanted = len(self.names)

        def catch(name: str) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if name in outputs or not isinstance(output, torch.Tensor):
                    return
                outputs[name] = output.clone()
                if len(outputs) == wanted:
                    raise _Enough

            return hook

        handles = [module.register_forward_hook(catch(name)) for name, module in self._targets]
        try:
            self.model(x)
        except _Enough:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [n for n in self.names if n not in outputs]
        if missing:
            raise InvalidArgument(
                f"module(s) {', '.join(missing)} returned no tensor in this forward (the model's "
                "control flow skipped them for this input); ask for modules that run on every "
                "input"
            )
        return {name: outputs[name] for name in self.names}


def build_hook_extractor(catalog: Catalog, names: Sequence[str]) -> HookExtractor:
    """The hooks counterpart of catalog.build_extractor (names: full node names)."""
    extractor = HookExtractor(catalog.root, names)
    extractor.eval()
    return extractor
