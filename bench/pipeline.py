"""Shared by the benchmark's peers: building the model, the tensor preprocessing, GeM.

The in-process baseline (bench/systems.py) and the LitServe app (bench/litserve_app.py) use
these exact functions, so both run the same decode + preprocess + truncated forward as layertap
(torchvision's JPEG decoder, antialiased resize of the uint8 image to 256, centre crop 224,
ImageNet normalisation; `create_feature_extractor` cut at the node; GeM p=3).
"""

from __future__ import annotations

import torch
import torchvision

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load_model(arch: str, weights: str | None, device: str) -> torch.nn.Module:
    """torchvision model with the named weights (read from the local torch cache; torchvision
    downloads only what is missing, and the benchmark passes only cached names) or random init."""
    if weights in (None, "", "none"):
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch, weights=None)
    else:
        model = torchvision.models.get_model(arch, weights=weights)
    return model.eval().to(device)


def feature_extractor(model: torch.nn.Module, node: str) -> torch.nn.Module:
    """The graph cut at `node` (torchvision's create_feature_extractor), output key 'feat'."""
    from torchvision.models.feature_extraction import create_feature_extractor

    return create_feature_extractor(model, {node: "feat"}).eval()


def preprocess_jpeg(data: bytes) -> torch.Tensor:
    """JPEG bytes -> float32 [3, 224, 224]: decode, resize 256 (antialiased), crop, normalise."""
    import torchvision.transforms.v2.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    img = F.resize(img, [256], antialias=True)
    img = F.center_crop(img, [224, 224])
    return (img.float().div_(255) - MEAN) / STD


def gem(feat: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """Generalised-mean pooling of an NCHW map -> [N, C]."""
    return feat.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
