"""Settings only `layertap serve` applies, on a real process: log_format and shutdown_delay_s.

`--log-format text`: every stderr line is plain text (none parses as JSON) in the documented
"<time> <LEVEL> <logger>: <message>" shape, and a failed request's line carries its request
fields (request_id, method, model, code, duration_ms) after the message, quoted, so the id a
client got in its `x-request-id` trailer can be found. `--shutdown-delay-s`: after SIGTERM, health
says NOT_SERVING while Extract still works (the delay is 60 s, far beyond what the test needs;
the process is killed afterwards), and the shutdown log line names the delay.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

TESTS = Path(__file__).resolve().parent
DELAY_S = 60
SIZE = 16
REQUEST_ID = 'text-log "test"'  # quotes: written escaped, inside quotes
EVIL_MODEL = "evil\nINJECTED fake line"  # a client's string must not start a log line
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    config = tmp_path / "layertap.toml"
    config.write_text(
        '[server]\nlog_level = "INFO"\n\n[[models]]\nname = "tiny"\n'
        'factory = "factories:tiny_net"\nweights = "none"\nallow_random = true\n'
        f"input_size = [{SIZE}, {SIZE}]\n"
    )
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERTAP_")}
    env["LAYERTAP_HTTP_PORT"] = "0"  # never a fixed port in tests
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    log = tmp_path / "server.stderr"
    with open(log, "wb") as stderr:
        args = ["--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        args += ["--metrics", "off", "--log-format", "text", "--shutdown-delay-s", str(DELAY_S)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "layertap.client.cli", "serve", *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    try:
        yield proc, f"127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(response.status)


def _wait_for(proc: subprocess.Popen[bytes], channel: grpc.Channel, status: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited: {log.read_text()[-3000:]}"
        try:
            if _health(channel) == status:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    pytest.fail(f"health never {status}: {log.read_text()[-3000:]}")


def _request(nodes: list[str]) -> pb.ExtractRequest:
    x = np.ones((1, 3, SIZE, SIZE), np.float32)
    tensor = pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes())
    return pb.ExtractRequest(model="tiny", images=[pb.Image(tensor=tensor)], nodes=nodes)


def test_text_log_and_shutdown_delay(
    served: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    proc, target, log = served
    with grpc.insecure_channel(target) as channel:
        _wait_for(proc, channel, health_pb2.HealthCheckResponse.SERVING, log)
        stub = pb_grpc.FeatureServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Extract(
                _request(["no_such_node"]),
                metadata=(("x-request-id", REQUEST_ID),),
                timeout=30,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        evil = pb.ExtractRequest(model=EVIL_MODEL, images=_request(["head"]).images)
        with pytest.raises(grpc.RpcError) as info:
            stub.Extract(evil, timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        proc.send_signal(signal.SIGTERM)
        _wait_for(proc, channel, health_pb2.HealthCheckResponse.NOT_SERVING, log)
        # within shutdown_delay_s: NOT_SERVING, yet still serving
        response = stub.Extract(_request(["head"]), timeout=30)
        assert [o.key for o in response.results[0].outputs] == ["head"]

    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines, "nothing logged"
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            pass
        else:
            pytest.fail(f"a JSON line under log_format text: {line!r}")
    records = [line for line in lines if LINE.match(line)]
    assert not any(line.startswith("INJECTED") for line in lines), lines
    assert any(f"model={json.dumps(EVIL_MODEL)}" in line for line in records), lines
    assert any("layertap serving on 127.0.0.1:" in line for line in records), lines
    assert any(f"health NOT_SERVING for {DELAY_S:.1f}s" in line for line in records), lines
    failed = [line for line in records if "Extract INVALID_ARGUMENT" in line]
    assert len(failed) == 1, lines
    line = failed[0]
    assert " WARNING layertap.server.service: " in line
    for field in (f"request_id={json.dumps(REQUEST_ID)}", 'method="Extract"', 'model="tiny"'):
        assert field in line, (field, line)
    assert 'code="INVALID_ARGUMENT"' in line
    assert re.search(r" duration_ms=\d+(\.\d+)?$", line), line
