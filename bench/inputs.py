"""What every benchmarked system is fed: the same real JPEG photos and the same models."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "china", "flower", "grace_hopper")


def photos(names: tuple[str, ...] = PHOTOS) -> list[tuple[str, bytes]]:
    """Real photos, each encoded once as JPEG (quality 90) and reused by every system. Each
    source package is imported only when one of its photos is asked for."""
    from PIL import Image

    out = []
    for name in names:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            array = np.asarray(load_sample_image(f"{name}.jpg"))
        elif name == "grace_hopper":
            import matplotlib.cbook

            with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
                array = np.asarray(Image.open(fh).convert("RGB"))
        else:
            import skimage.data

            array = np.asarray(getattr(skimage.data, name)())
        buf = io.BytesIO()
        Image.fromarray(array[..., :3]).save(buf, "JPEG", quality=90)
        out.append((name, buf.getvalue()))
    return out


def cached_weights(arch: str) -> str | None:
    """The torchvision weights name of `arch` whose file is already in the torch cache."""
    import torch
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        return None
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for w in enum:
        if (checkpoints / os.path.basename(w.url)).is_file():
            return w.name
    return None


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    node: str
    weights: str | None  # torchvision weights name, or None: random init

    @property
    def weights_label(self) -> str:
        return f"ImageNet ({self.weights})" if self.weights else "random init"


def parse_model(text: str, allow_weights: bool = True) -> ModelSpec:
    arch, sep, node = text.partition(":")
    if not sep or not node:
        raise SystemExit(f"--models entries are arch:node (e.g. resnet50:layer4), got {text!r}")
    return ModelSpec(arch, node, cached_weights(arch) if allow_weights else None)
