"""The committed stubs are exactly what the pinned, deliberately old grpcio-tools generates from
the .proto (Makefile: PROTO_TOOLS, in a venv of its own, build/proto-tools, made here when
missing), and that pin is what the client's dependency floors in pyproject.toml follow."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = {  # .proto -> its generated stubs
    "layertap/v1/layertap.proto": ("layertap_pb2.py", "layertap_pb2.pyi", "layertap_pb2_grpc.py"),
    "layertap/kserve/v2/open_inference.proto": (
        "open_inference_pb2.py",
        "open_inference_pb2.pyi",
        "open_inference_pb2_grpc.py",
    ),
}
TOOLS_VENV = ROOT / "build" / "proto-tools"


def _pin() -> str:
    found = re.search(
        r"^PROTO_TOOLS := (grpcio-tools==\S+)$", (ROOT / "Makefile").read_text(), re.M
    )
    assert found, "Makefile lost its PROTO_TOOLS pin"
    return found.group(1)


def _tools_python() -> Path:
    """The proto tools venv `make proto` uses, made (or refreshed) for the pinned version."""
    python = TOOLS_VENV / "bin" / "python"
    stamp = TOOLS_VENV / ".pinned"
    if not python.exists() or not stamp.exists() or stamp.read_text() != _pin():
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", _pin()], check=True, timeout=600)
        stamp.write_text(_pin())
    return python


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            str(_tools_python()),
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *(str(ROOT / "proto" / proto) for proto in PROTOS),
        ],
        check=True,
    )
    for proto, names in PROTOS.items():
        folder = Path(proto).parent
        for name in names:
            fresh = (tmp_path / folder / name).read_text()
            committed = (ROOT / "proto" / folder / name).read_text()
            assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"


def test_client_floors_follow_the_generated_code() -> None:
    """The stubs check grpcio >= the version that generated them, and their protobuf gencode
    version is the runtime floor: pyproject's floors must be exactly those."""
    stubs = ROOT / "proto/layertap/v1"
    grpc_version = re.search(
        r"GRPC_GENERATED_VERSION = '([\d.]+)'", (stubs / "layertap_pb2_grpc.py").read_text()
    )
    gencode = re.search(
        r"# Protobuf Python Version: ([\d.]+)", (stubs / "layertap_pb2.py").read_text()
    )
    assert grpc_version and gencode
    assert _pin() == f"grpcio-tools=={grpc_version.group(1)}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"grpcio>={grpc_version.group(1)}"' in pyproject
    assert f'"protobuf>={gencode.group(1)},<8"' in pyproject
