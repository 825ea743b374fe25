"""layertap's Open Inference Protocol (KServe v2) .proto is wire-compatible with the protocol
as Triton's tritonclient (PyPI) speaks it: every message and field of ours exists in
tritonclient's `grpc_service.proto` with the same number, type and label, and every RPC of
ours has the same request and response types there.

The two files define the same `inference.*` symbols, so they cannot share one process's default
descriptor pool: tritonclient runs in a venv of its own here, and ours is read into a separate
pool from `protoc --descriptor_set_out` (the pinned proto tools of tests/test_proto.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_proto import _tools_python

ROOT = Path(__file__).resolve().parents[1]
PROTO = "layertap/kserve/v2/open_inference.proto"
CHECK = """
import sys
from google.protobuf import descriptor_pb2, descriptor_pool
import tritonclient.grpc.service_pb2 as theirs
fds = descriptor_pb2.FileDescriptorSet.FromString(open(sys.argv[1], "rb").read())
pool = descriptor_pool.DescriptorPool()
for f in fds.file:
    pool.Add(f)
ours = pool.FindFileByName(sys.argv[2])

def shape(f):
    return (f.number, f.type, f.is_repeated if hasattr(f, "is_repeated") else f.label == 3)

def walk(desc, other, path):
    for f in desc.fields:
        g = other.fields_by_name.get(f.name)
        if g is None:
            yield f"{path}.{f.name}: not in tritonclient's proto"
        elif shape(f) != shape(g):
            yield f"{path}.{f.name}: {shape(f)} vs {shape(g)}"
        elif f.message_type is not None and not f.message_type.GetOptions().map_entry:
            yield from walk(f.message_type, g.message_type, f"{path}.{f.name}")

problems = []
for name, desc in ours.message_types_by_name.items():
    other = theirs.DESCRIPTOR.message_types_by_name.get(name)
    if other is None:
        problems.append(f"{name}: not in tritonclient's proto")
    else:
        problems += walk(desc, other, name)
service = ours.services_by_name["GRPCInferenceService"]
triton = theirs.DESCRIPTOR.services_by_name["GRPCInferenceService"]
for m in service.methods:
    t = triton.methods_by_name.get(m.name)
    if t is None or (t.input_type.full_name, t.output_type.full_name) != (
        m.input_type.full_name, m.output_type.full_name
    ):
        problems.append(f"rpc {m.name}")
print(len(service.methods), len(ours.message_types_by_name))
print("\\n".join(problems) or "compatible")
"""


@pytest.mark.slow
def test_wire_compatible_with_tritonclient(tmp_path: Path, triton_python: Path) -> None:
    descriptors = tmp_path / "ours.pb"
    subprocess.run(
        [
            str(_tools_python()), "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
            f"--descriptor_set_out={descriptors}", PROTO,
        ],
        check=True,
    )  # fmt: skip
    out = subprocess.run(
        [str(triton_python), "-c", CHECK, str(descriptors), PROTO], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    counts, verdict = out.stdout.strip().split("\n", 1)
    assert counts == "7 15", counts  # seven RPCs, fifteen top-level messages: all compared
    assert verdict == "compatible", verdict
