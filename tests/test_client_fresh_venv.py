"""`pip install .` in a brand-new virtual environment gives a working client and no torch."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_client_installs_and_imports_without_torch(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)], check=True, timeout=600)
    installed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.lower()
    assert "torch" not in installed and "pillow" not in installed, installed
    script = (
        "import sys, numpy as np\n"
        "from layertap.client import FeatureClient\n"
        "from layertap.client._images import images_to_proto\n"
        "images = images_to_proto([np.zeros((4, 5, 3), np.uint8), b'jpeg-bytes'])\n"
        "assert list(images[0].tensor.shape) == [4, 5, 3] and images[1].encoded\n"
        "with FeatureClient('127.0.0.1:1', timeout=1) as c: pass\n"
        "assert 'torch' not in sys.modules and 'PIL' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([str(python), "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    cli = subprocess.run(
        [str(env_dir / "bin" / "layertap"), "serve"], capture_output=True, text=True
    )
    assert cli.returncode == 2 and "layertap[server]" in (cli.stderr + cli.stdout)
