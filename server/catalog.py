"""The node catalogue of one model: its eval graph, the nodes clients may ask for, their shapes.

Built once per model on the worker thread, then read-only: name resolution and DescribeModel use
plain Python data, so they are safe from the event loop.

Why our own trace instead of get_graph_node_names/create_feature_extractor calls per request:
those trace train and eval graphs and call .train() on the shared model (flipping BatchNorm for
every extractor built from it), and they put requested names unescaped into a regex. We trace
the eval graph once with torchvision's own NodePathTracer (same node names), and shapes come from
shape propagation on fake tensors: no real forward, except one on a zero batch at load for a
model whose leaf modules cannot run on fake tensors (_propagate).
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.models.feature_extraction import NodePathTracer, _set_default_tracer_kwargs

from .errors import UnknownNode
from .layouts import channels_first, flattens_a_map, layout_of
from .node_names import NodeNames
from .spec import NodeSpec
from .trace_gate import tracing

log = logging.getLogger(__name__)

# torch.fx's tracer patches torch.nn.Module.__call__ and __getattr__ on the class while it
# traces: two traces overlapping in two worker threads (several devices loading at once)
# fail, or restore each other's wrappers and leave the class patched for the life of the
# process, breaking every later forward; shape propagation on fake tensors fails when run in
# two threads at once too; and a forward on another thread meanwhile enters the tracer's
# wrappers. One catalogue build at a time, process-wide, and no forward during it
# (server/trace_gate.py).

WIRE_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.uint8: "uint8",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
    torch.float64: "float64",
}


@dataclass
class Catalog:
    """The nodes one model offers: from its traced eval graph (mode "fx"), or its named modules
    seen by forward hooks during one forward (mode "hooks", server/hooks.py; graph is None)."""

    root: nn.Module
    graph: fx.Graph | None
    input_size: tuple[int, int]
    nodes: list[NodeSpec]
    # every qualified node name of the eval graph, in execution order (torchvision's eval names);
    # in hooks mode every named module
    all_names: list[str]
    fx_nodes: dict[str, fx.Node] = field(repr=False)
    input_name: str = "x"
    mode: str = "fx"  # "fx" | "hooks"
    reason: str = ""  # why this mode (DescribeModel's extraction_reason)
    # hooks mode: modules that ran but are not nodes, with why ("outputs a tuple, not a tensor")
    skipped: dict[str, str] = field(default_factory=dict, repr=False)
    # tensors the trace made graph constants (`_tensor_constant0`: a tensor computed outside
    # the graph, such as MaxViT's relative position index .view(-1)); the trace attached them
    # to the model, which _state_restored put back as it was, so extractors take them here
    constants: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    by_name: dict[str, NodeSpec] = field(init=False, repr=False)
    order: dict[str, int] = field(init=False, repr=False)  # execution position of each node
    token_counts: frozenset[int] = field(init=False, repr=False)  # L of every NLC node
    names_index: NodeNames = field(init=False, repr=False)  # truncated names, suggestions

    def __post_init__(self) -> None:
        self.by_name = {n.name: n for n in self.nodes}
        self.order = {n.name: i for i, n in enumerate(self.nodes)}
        self.token_counts = frozenset(
            n.shape[1] for n in self.nodes if n.layout == "NLC" and len(n.shape) == 3
        )
        self.names_index = NodeNames([n.name for n in self.nodes])

    def prefix_tokens(self, name: str, model_prefix: int) -> int:
        """The leading CLS/register tokens of node `name` when the model has `model_prefix` of
        them (ModelInfo.prefix_tokens): that count for its token outputs, except those computed
        before the prefix tokens are prepended (ViT's `permute`, DINOv2's `patch_embed`: L
        patch tokens where the blocks carry L + model_prefix), which have none; 0 for
        non-token nodes. Token pools must skip exactly these (`cls` on a patch embedding has no
        CLS token to return)."""
        node = self.by_name[name]
        if model_prefix <= 0 or node.layout != "NLC" or len(node.shape) != 3:
            return 0
        if node.shape[1] + model_prefix in self.token_counts:
            return 0  # another node has these tokens plus the prefix: they were prepended later
        return model_prefix

    def in_order(self, names: Iterable[str]) -> tuple[str, ...]:
        """Full node names, deduplicated, in execution order: the extractor cache key, so
        equal node sets (however requested) share one extractor."""
        return tuple(sorted(set(names), key=self.order.__getitem__))

    def resolve(self, requested: str) -> str:
        """Full or truncated name → one full node name (torchvision's rule: the last node under
        that dotted prefix). Raises UnknownNode with the closest valid names."""
        if requested in self.by_name:
            return requested
        if requested and requested not in self.skipped:  # hooks: a module's own output or none
            last = self.names_index.last_under.get(requested)  # one lookup, not a graph walk
            if last is not None:
                return last
        raise UnknownNode(self._unknown_message(requested))

    def closest(self, requested: str, n: int = 5) -> list[str]:
        """Up to n node names close to `requested`, in bounded time (NodeNames.closest)."""
        return self.names_index.closest(requested, n)

    def _unknown_message(self, requested: str) -> str:
        close = self.closest(requested)
        shown = repr(requested[:80]) + ("…" if len(requested) > 80 else "")
        hint = f"; closest valid names: {', '.join(close)}" if close else ""
        if requested == self.input_name:
            return (
                f"node {shown} is the model input itself, not an activation{hint}. "
                "Hint: call DescribeModel for the list."
            )
        if requested in self.skipped:
            return (
                f"module {shown} {self.skipped[requested]}: this model is served through forward "
                f"hooks, which return module outputs that are batch-first tensors{hint}. Hint: "
                "ask for one of its submodules (DescribeModel lists the nodes)."
            )
        if requested in self.all_names and self.mode == "hooks":
            return (
                f"module {shown} did not return a tensor in the forward at load (it did not run "
                f"for a {self.input_size[0]}x{self.input_size[1]} input, or it is a container "
                f"such as a ModuleList that is never called){hint}. Hint: call DescribeModel "
                "for the modules that are nodes."
            )
        if requested in self.all_names:
            return (
                f"node {shown} exists but does not produce a batch-dependent tensor "
                f"(e.g. a shape or a weight){hint}. Hint: call DescribeModel for the list."
            )
        return f"unknown node {shown}{hint}. Hint: call DescribeModel to list this model's nodes."


def _tracer(leaf_modules: Sequence[type], autowrap_functions: Sequence[object]) -> NodePathTracer:
    kwargs: dict[str, object] = {}
    if leaf_modules:
        kwargs["leaf_modules"] = list(leaf_modules)
    if autowrap_functions:
        kwargs["autowrap_functions"] = tuple(autowrap_functions)
    return NodePathTracer(**_set_default_tracer_kwargs(kwargs))


def _propagate(gm: fx.GraphModule, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]] | None:
    """Shapes of every tensor node for an input of `shape`, on fake tensors (no compute).

    Leaf modules with data-dependent control flow cannot run on fake tensors; for those alone
    we fall back to one real forward on a zero input (at load time, never per request)."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    try:
        if device.type == "meta":
            ShapeProp(gm).propagate(torch.empty(shape, device="meta"))
        else:
            try:
                fake = FakeTensorMode(allow_non_fake_inputs=True)
                # ShapeProp prints the traceback of errors it re-raises; we handle them
                with contextlib.redirect_stderr(io.StringIO()):
                    ShapeProp(gm, fake_mode=fake).propagate(torch.empty(shape, device=device))
            except Exception as exc:
                log.debug("fake shape propagation failed (%s); one real forward instead", exc)
                with torch.inference_mode():
                    ShapeProp(gm).propagate(torch.zeros(shape, device=device))
    except Exception as exc:  # a model that fixes its input size refuses other shapes
        log.debug("shape propagation at %s failed: %s", shape, exc)
        return None
    out: dict[str, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out[node.name] = tuple(int(d) for d in meta.shape)
    return out


def _target_name(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(str(node.target))).__name__
    target = node.target
    return getattr(target, "__name__", str(target))


def default_prefix_tokens(module: nn.Module) -> int:
    """Leading CLS/register tokens of a module's token outputs, read from its attributes (for
    `prefix_tokens = -1`): timm's `num_prefix_tokens`; else 1 for a CLS token tensor
    (torchvision's `class_token`, DINOv2's and timm's `cls_token`) plus DINOv2's
    `num_register_tokens`; else 0."""
    timm = getattr(module, "num_prefix_tokens", None)
    if isinstance(timm, int) and not isinstance(timm, bool) and timm >= 0:
        return timm
    cls = any(
        isinstance(getattr(module, a, None), torch.Tensor) for a in ("class_token", "cls_token")
    )
    registers = getattr(module, "num_register_tokens", 0)
    if isinstance(registers, bool) or not isinstance(registers, int) or registers < 0:
        registers = 0
    return int(cls) + registers


_MISSING = object()


@contextlib.contextmanager
def _state_restored(model: nn.Module) -> Iterator[None]:
    """Put every module's attributes, buffers, parameters and children back as they were.

    Symbolic tracing runs the model's Python forward on Proxies, and shape propagation runs leaf
    modules on fake tensors: code that caches on the module (`if self.grid is None: self.grid =
    ...`) would keep a Proxy or a fake tensor there and break every real forward after it (the
    hooks fallback's, or another entry's sharing this module)."""
    saved = [
        (m, [(store, dict(store)) for store in (m.__dict__, m._buffers, m._parameters, m._modules)])
        for m in model.modules()
    ]
    try:
        yield
    finally:
        for _, stores in saved:
            for store, before in stores:
                for key in [k for k in store if k not in before]:
                    del store[key]
                for key, value in before.items():
                    if store.get(key, _MISSING) is not value:
                        store[key] = value


def _attr_targets(graph: fx.Graph, modules: bool = False) -> set[str]:
    """The attributes the graph reads (get_attr), and with `modules` the modules it calls."""
    ops = ("get_attr", "call_module") if modules else ("get_attr",)
    return {str(n.target) for n in graph.nodes if n.op in ops}


def _has_attr(root: nn.Module, target: str) -> bool:
    try:
        operator.attrgetter(target)(root)
    except AttributeError:
        return False
    return True


def build_catalog(
    model: nn.Module,
    input_size: tuple[int, int],
    leaf_modules: Sequence[type] = (),
    autowrap_functions: Sequence[object] = (),
    map_layout: str = "",
) -> Catalog:
    """Trace the eval graph and find its batch-dependent tensor nodes with their shapes.
    `map_layout`: "NHWC" when the model's library says its feature maps are channels-last
    (timm's output_fmt); used for 4-D nodes only where no probe could tell (a model that fixes
    its input size), except the outputs of channels-first layers (convolutions, BatchNorm,
    pooling), which stay NCHW."""
    model.eval()
    h, w = input_size
    # one trace and shape propagation at a time, and no forward anywhere meanwhile
    # (trace_gate); a failed trace must not leave
    # Proxies behind (hooks fallback)
    with tracing(), _state_restored(model):
        tracer = _tracer(leaf_modules, autowrap_functions)
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph)
        # The probe (a larger input) tells spatial dims from channels; models that fix their
        # input size (ViT) refuse it, which is fine. Base runs last so node.meta keeps the real
        # shapes.
        with contextlib.redirect_stderr(io.StringIO()):
            probe = _propagate(gm, (2, 3, h + 64, w + 64))
        base = _propagate(gm, (2, 3, h, w))
        attached = {t: operator.attrgetter(t)(model) for t in _attr_targets(graph)}
    constants = {t: v for t, v in attached.items() if not _has_attr(model, t)}
    if base is None:
        raise RuntimeError(f"shape propagation failed at input {h}x{w}")

    # batch-dependent: computed from the input, a tensor, batch on dim 0
    depends: set[fx.Node] = set()
    layouts: dict[fx.Node, str] = {}
    nodes: list[NodeSpec] = []
    fx_nodes: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            depends.add(node)
            continue
        if not any(arg in depends for arg in node.all_input_nodes):
            continue
        depends.add(node)
        name = tracer.node_to_qualname.get(node)
        shape = base.get(node.name)
        meta = node.meta.get("tensor_meta")
        if name is None or shape is None or not shape or shape[0] != 2 or meta is None:
            continue
        one = (1, *shape[1:])
        probe_shape = probe.get(node.name) if probe else None
        if not probe_shape or len(probe_shape) != len(shape):
            probe_shape = None
        layout = layout_of(shape, probe_shape)
        if probe_shape is None and layout == "NCHW" and map_layout == "NHWC":
            layout = "NCHW" if channels_first(node, tracer.root) else "NHWC"
        if probe_shape is None and layout == "NLC" and flattens_a_map(node, base, layouts):
            layout = ""  # [N, C, H*W] (ViT's reshape before its permute): not tokens
        layouts[node] = layout
        nodes.append(
            NodeSpec(
                name=name,
                shape=one,
                dtype=WIRE_DTYPES.get(meta.dtype, str(meta.dtype).replace("torch.", "")),
                layout=layout,
                op=node.op,
                target=_target_name(node, tracer.root),
            )
        )
        fx_nodes[name] = node
    return Catalog(
        root=tracer.root,
        graph=graph,
        input_size=input_size,
        nodes=nodes,
        all_names=list(tracer.node_to_qualname.values()),
        fx_nodes=fx_nodes,
        constants=constants,
        input_name=next(
            (tracer.node_to_qualname.get(n, n.name) for n in graph.nodes if n.op == "placeholder"),
            "x",
        ),
    )


def build_extractor(catalog: Catalog, names: Sequence[str]) -> fx.GraphModule:
    """A graph module returning {full name: tensor} for `names`, sharing the model's weights.

    Each requested value is cloned right where it is produced, so a later in-place op (ReLU
    with inplace=True, x.relu_(), ...) cannot overwrite what we return.
    """
    if catalog.graph is None:
        raise ValueError(f"this catalogue has no fx graph (mode {catalog.mode!r})")
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(catalog.graph, val_map, return_output_node=False)
    for node in list(graph.nodes):
        if node.op == "output":
            graph.erase_node(node)
    outputs: dict[str, fx.Node] = {}
    for name in names:
        produced = val_map[catalog.fx_nodes[name]]
        with graph.inserting_after(produced):
            outputs[name] = graph.call_method("clone", (produced,))
    graph.output(outputs)
    # from a dict, not the model: the model no longer holds the trace's constants
    root = {
        t: catalog.constants[t] if t in catalog.constants else operator.attrgetter(t)(catalog.root)
        for t in _attr_targets(graph, modules=True)
    }
    gm = fx.GraphModule(root, graph, class_name="LayertapExtractor")
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    return gm


def module_tree(model: nn.Module) -> list[tuple[str, str, int]]:
    """(dotted name, class name, own parameter count) for every module, depth first."""
    return [
        (name, type(mod).__name__, sum(p.numel() for p in mod.parameters(recurse=False)))
        for name, mod in model.named_modules()
    ]
