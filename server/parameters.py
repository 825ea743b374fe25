"""GetParameters: a loaded model's named parameters, buffers or a module's own parameters,
checked against the size limit and copied to the CPU in the asked dtype.

Runs on the device's worker thread (ModelRuntime.parameters), where the model lives, so no
forward or transfer runs beside it.
"""

from __future__ import annotations

import difflib

import torch

from .errors import InvalidArgument, LimitExceeded
from .loaded import LoadedModel


def read_parameters(
    loaded: LoadedModel, names: tuple[str, ...], dtype: torch.dtype, max_bytes: int
) -> list[tuple[str, torch.Tensor]]:
    """CPU copies in `dtype`, in request order (duplicates once); InvalidArgument for unknown
    names or a module without parameters of its own, LimitExceeded past `max_bytes`."""
    module = loaded.weights.module
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    modules = dict(module.named_modules(remove_duplicate=False))
    wanted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name in names:
        if name in tensors:
            wanted.setdefault(name, tensors[name])
        elif name and name in modules:
            own = list(modules[name].named_parameters(prefix=name, recurse=False))
            if not own:
                raise InvalidArgument(
                    f"module {name!r} ({type(modules[name]).__name__}) has no parameters "
                    "of its own (a module path returns its own parameters, not its "
                    "children's); name a submodule or a full parameter name — "
                    "DescribeModel's modules list own_parameters per module"
                )
            for full, tensor in own:
                wanted.setdefault(full, tensor)
        else:
            unknown.append(name)
    if unknown:
        candidates = [*tensors, *(m for m in modules if m)]
        close = difflib.get_close_matches(unknown[0], candidates, n=5, cutoff=0.5)
        hint = f"closest: {', '.join(map(repr, close))}; " if close else ""
        shown = ", ".join(repr(n[:80]) for n in unknown[:5])
        raise InvalidArgument(
            f"model {loaded.config.name!r} has no parameter, buffer or module named {shown}; "
            f"{hint}see DescribeModel's modules for the module paths"
        )
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(t.numel() for t in wanted.values()) * itemsize
    if total > max_bytes:
        raise LimitExceeded(
            f"the {len(wanted)} requested parameters are {total} bytes as "
            f"{str(dtype).removeprefix('torch.')}, over max_parameter_bytes={max_bytes}; "
            "ask for fewer names per call or a 2-byte dtype"
        )
    with torch.inference_mode():
        return [
            (name, t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous())
            for name, t in wanted.items()
        ]
