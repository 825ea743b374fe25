"""Small custom models the tests register through the config's `factory` key."""

from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    """Conv → ReLU(inplace) (→ `convs - 1` 1x1 convs) → 3 max-pools: refuses inputs smaller
    than 8x8, like real CNNs do."""

    def __init__(self, width: int = 8, convs: int = 1) -> None:
        super().__init__()
        more = (nn.Conv2d(width, width, 1) for _ in range(convs - 1))
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True), *more)
        self.pools = nn.Sequential(*(nn.MaxPool2d(2) for _ in range(3)))
        self.head = nn.Linear(width, 4)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.pools(self.stem(x))
        return self.head(x.mean((2, 3)))


def tiny_net(width: int = 8, convs: int = 1) -> nn.Module:
    return TinyNet(width, convs)


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace through it (it must be a leaf)."""

    def forward(self, x):  # type: ignore[no-untyped-def]
        if x.mean() > 0:
            return x * 2
        return -x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.gate(self.conv(x)).mean((2, 3)))


def gated_net() -> nn.Module:
    return GatedNet()


# --- fault injection for tests/reliability/test_faults.py ----------------------------------
# A leaf module (list "factories:Probe" in the model's leaf_modules) sees the raw input batch in
# every real forward: it records what it saw, and can be slow, fail, or run "out of memory".
# Fake/meta tensors (shape propagation while the catalogue is built) pass through unrecorded.

import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

PROBE_LOG: dict[str, list[dict[str, object]]] = {}
_PROBE_LOCK = threading.Lock()


PROBE_HOLDS: dict[str, threading.Event] = {}


def hold_probe(tag: str) -> threading.Event:
    """From now on the probe of model `tag` blocks in every real forward (after recording it)
    until the returned event is set: a test holds the worker busy for as long as it needs to
    queue requests behind it, instead of racing a fixed delay. Set it in a `finally`; a forgotten
    hold still gives up after 30 s."""
    event = threading.Event()
    with _PROBE_LOCK:
        PROBE_HOLDS[tag] = event
    return event


def probe_log(tag: str) -> list[dict[str, object]]:
    """A copy of what the probe of model `tag` saw: one dict per real forward."""
    with _PROBE_LOCK:
        return list(PROBE_LOG.get(tag, []))


class Probe(nn.Module):
    """Records each real batch (size, per-image max); waits while a test holds it (hold_probe);
    sleeps `delay_s`; raises
    RuntimeError("injected fault ...") when any input value exceeds `fail_above`; raises
    torch.cuda.OutOfMemoryError when the batch is larger than `oom_above` or any input value
    exceeds `oom_value_above` (an image too large to fit even alone)."""

    def __init__(
        self,
        tag: str,
        delay_s: float = 0.0,
        fail_above: float | None = None,
        oom_above: int | None = None,
        oom_value_above: float | None = None,
    ) -> None:
        super().__init__()
        self.tag, self.delay_s = tag, delay_s
        self.fail_above, self.oom_above = fail_above, oom_above
        self.oom_value_above = oom_value_above

    def forward(self, x):  # type: ignore[no-untyped-def]
        if type(x) is not torch.Tensor or x.device.type == "meta":
            return x.clone()
        maxima = [float(v) for v in x.flatten(1).amax(1)]
        event: dict[str, object] = {"batch": int(x.shape[0]), "max": maxima, "outcome": "ok"}
        with _PROBE_LOCK:
            PROBE_LOG.setdefault(self.tag, []).append(event)
            hold = PROBE_HOLDS.get(self.tag)
        if hold is not None:
            hold.wait(30)
        too_big = self.oom_value_above is not None and max(maxima) > self.oom_value_above
        if too_big or (self.oom_above is not None and x.shape[0] > self.oom_above):
            event["outcome"] = "oom"
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (injected, batch {x.shape[0]})"
            )
        if self.fail_above is not None and max(maxima) > self.fail_above:
            event["outcome"] = "fault"
            raise RuntimeError(f"injected fault: input value above {self.fail_above}")
        if self.delay_s:
            time.sleep(self.delay_s)
        return x.clone()


class ProbeNet(nn.Module):
    """Probe → conv → ReLU → global average: nodes `probe`, `conv`, `relu`, `mean`."""

    def __init__(self, probe: Probe, width: int = 4) -> None:
        super().__init__()
        self.probe = probe
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.relu(self.conv(self.probe(x))).mean((2, 3))


def probe_net(
    tag: str,
    delay_s: float = 0.0,
    fail_above: float | None = None,
    oom_above: int | None = None,
    oom_value_above: float | None = None,
    width: int = 4,
) -> nn.Module:
    """The same weights on every call (seeded, without touching the global RNG), so a test can
    build its own copy as the reference."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ProbeNet(Probe(tag, delay_s, fail_above, oom_above, oom_value_above), width)


class ViewingNet(nn.Module):
    """Flattens a feature map with .view, as older model code does: fine in the default
    layout, a RuntimeError in channels-last (the map is not contiguous there)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)  # two convolutions: auto times it
        self.head = nn.Linear(1, 2)

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = self.conv2(self.conv(x))  # [N, C, H, W]: merging C with H and W needs NCHW memory
        return self.head(y.view(y.shape[0], -1).mean(1, keepdim=True))


def viewing_net() -> nn.Module:
    return ViewingNet()


# --- settings coverage (tests/test_model_overrides.py) ---------------------------------------
def opaque_gate(x):  # type: ignore[no-untyped-def]
    """Data-dependent control flow in a plain function: torch.fx cannot trace through it unless
    the model's `autowrap_functions` lists it ("factories:opaque_gate")."""
    if x.mean() > 0:
        return x * 2
    return -x


class AutowrapNet(nn.Module):
    """conv → opaque_gate → global average: nodes `conv`, `opaque_gate`, `mean`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return opaque_gate(self.conv(x)).mean((2, 3))


def autowrap_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutowrapNet()


class TokenNet(nn.Module):
    """8x8 patches → `extra` learned tokens prepended → a linear layer: NLC outputs
    [N, extra + patches, width] with no cls_token attribute (prefix_tokens auto reads 0)."""

    def __init__(self, extra: int = 2, width: int = 6) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, 8, stride=8)
        self.extra_tokens = nn.Parameter(torch.randn(1, extra, width))
        self.mix = nn.Linear(width, width)

    def forward(self, x):  # type: ignore[no-untyped-def]
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.extra_tokens.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.mix(tokens)


def token_net(extra: int = 2, width: int = 6) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TokenNet(extra, width)
