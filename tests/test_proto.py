"""The committed stubs are exactly what the pinned grpcio-tools generates from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("layertap_pb2.py", "layertap_pb2.pyi", "layertap_pb2_grpc.py")


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "proto/layertap/v1/layertap.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "layertap/v1" / name).read_text()
        committed = (ROOT / "proto/layertap/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"


def test_grpcio_tools_is_the_pinned_version() -> None:
    from importlib.metadata import version

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"grpcio-tools=={version("grpcio-tools")}"' in pyproject
