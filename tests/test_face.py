"""examples/face: the face-embedding config as shipped, served and checked end to end.

The network is randomly initialised (seeded; no face weights can ship here), so the checks are
what does not depend on training: the preprocessing as configured, a 512-d L2-normalised
embedding equal to an in-process forward of the same module on the same crop, and that a JPEG
re-encoded copy of a face crop lands closer than another person's face (a random conv net is
still a smooth function of its input: 0.99 vs 0.46 with seed 0). Mirrored copies are not
asserted: see the end of the test.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from conftest import RunningServer, encode, photo, start_server
from PIL import Image

from layertap.client import FeatureClient
from layertap.server.settings import load_settings

FACE = Path(__file__).resolve().parent.parent / "examples" / "face"
CONFIG = FACE / "face.toml"


def _factory_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("face_iresnet_reference", FACE / "iresnet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def aligned_crop(name: str, top: int, left: int, size: int) -> np.ndarray:
    """Stand-in for the caller's 5-point alignment: a square box around the face, resized to
    112x112 on the client (the server does no resize for this model)."""
    box = photo(name)[top : top + size, left : left + size]
    return np.asarray(Image.fromarray(box).resize((112, 112), Image.Resampling.BICUBIC))


def jpeg_round_trip(array: np.ndarray, quality: int) -> np.ndarray:
    data = encode(array, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def face_server() -> Iterator[RunningServer]:
    settings = load_settings(["--config", str(CONFIG)], env={})
    running = start_server(dataclasses.replace(settings, port=0))
    yield running
    running.stop()


def test_face_config_reports_its_preprocessing(face_server: RunningServer) -> None:
    with FeatureClient(face_server.target) as client:
        (info,) = client.list_models()
        description = client.describe("arcface-r18")
    assert info.name == "arcface-r18" and info.ready and info.random_weights
    assert info.architecture.endswith("examples/face/iresnet.py:iresnet")
    assert tuple(info.input_size) == (112, 112)
    pre = info.preprocessing
    assert not pre.resize_size  # no resize: an aligned 112x112 crop passes through untouched
    assert tuple(pre.crop_size) == (112, 112)
    assert np.allclose(pre.mean, 0.5) and np.allclose(pre.std, 0.5)  # (x - 127.5) / 127.5
    assert description.node_names[-1] == "features"


def test_embedding_is_512d_l2_and_matches_in_process(face_server: RunningServer) -> None:
    a = aligned_crop("astronaut", 45, 160, 140)
    b = aligned_crop("grace_hopper", 140, 180, 180)
    views = {
        "a": a,
        "a_jpeg": jpeg_round_trip(a, 60),
        "a_flip": np.ascontiguousarray(a[:, ::-1]),
        "b": b,
    }
    with FeatureClient(face_server.target) as client:
        out = client.extract(
            [encode(v, "PNG") for v in views.values()],
            model="arcface-r18",
            nodes="features",
            normalize=True,
        )
    emb = out["features"]
    assert emb.shape == (4, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    model = _factory_module().iresnet(depth=18, seed=0).eval()
    x = torch.from_numpy(np.stack(list(views.values()))).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(model((x - 127.5) / 127.5), dim=1).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-4)

    cos = {k: float(emb[0] @ emb[i]) for i, k in enumerate(views)}
    assert cos["a_jpeg"] > cos["b"] + 0.2, cos
    # Not asserted: the mirrored crop. This net flattens the 7x7 map into its FC, so mirroring
    # moves every feature; untrained, it scores about as low as another face (0.45 vs 0.46 with
    # seed 0). Trained ArcFace weights (flip-augmented) are what make mirror copies close.
