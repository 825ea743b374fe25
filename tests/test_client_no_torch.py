"""The client must work where torch, torchvision and PIL are not installed.

A subprocess blocks those imports with a meta-path finder (as if they were absent) and then
uses the client; any import of them at module import time, or on the numpy/bytes paths,
fails the test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = ("torch", "torchvision", "PIL")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, Blocker())

    import numpy as np

    import layertap.client
    import layertap.client.cli
    from layertap.client import AsyncFeatureClient, FeatureClient
    from layertap.client._requests import build_extract_request
    from layertap.client._responses import decode_tensor

    with FeatureClient("127.0.0.1:1", timeout=1) as client:
        pass
    AsyncFeatureClient("127.0.0.1:1")

    request, n = build_extract_request(
        [np.zeros((4, 5, 3), np.uint8), b"\\x89PNG fake", np.zeros((3, 4, 4), np.float32)],
        model="m", nodes={"layer4": "feat"}, pool="gem", gem_p=3.0, normalize=False,
        dtype="bfloat16",
    )
    assert n == 3
    assert request.images[0].tensor.dtype == "uint8"
    assert request.images[1].encoded.startswith(b"\\x89PNG")
    assert decode_tensor(request.images[2].tensor).shape == (3, 4, 4)

    try:
        build_extract_request(object(), model="m", nodes="x", pool=None, gem_p=3.0,
                              normalize=False, dtype="float32")
    except TypeError:
        pass
    else:
        raise AssertionError("an unsupported object must raise TypeError")

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ok")
    """
)


def test_client_works_without_torch_and_pil() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_blocker_really_blocks() -> None:
    """Guard against a vacuous pass: the same blocker makes `import PIL` fail."""
    script = SCRIPT.split("import numpy as np")[0] + "import PIL\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "blocked for this test: PIL" in proc.stderr
