"""README's "Calling layertap from curl" and "from Triton/KServe clients" run as written against
`layertap serve` on the embedded default config (what `make serve` runs: mobilenet_v2 with its
real weights, resnet50 and vgg16), only its ports changed to free ones."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _section(title: str, language: str) -> str:
    """The first ```language block under README's `## title`."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    found = re.search(rf"```{language}\n(.*?)```", text[start:end], re.S)
    assert found, f"README section {title!r} lost its {language} block"
    return found.group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """`layertap serve` with no config (the embedded default): (gRPC port, HTTP port)."""
    port, http_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERTAP_")}
    env.update(LAYERTAP_COMPILE_BUDGET_S="0", LAYERTAP_METRICS="false")
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--port", str(port), "--http-port", str(http_port), "--log-format", "text"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "layertap.client.cli", "serve", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 300
        for model in ("mobilenet_v2", "resnet50", "vgg16"):
            url = f"http://127.0.0.1:{http_port}/v2/models/{model}/ready"
            while not _ok(url):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, (
                    f"{model} never ready: {log.read_text()[-3000:]}"
                )
                time.sleep(0.5)
        yield port, http_port
    finally:
        proc.terminate()
        proc.wait(60)


def _ok(url: str) -> bool:
    try:
        return bool(urllib.request.urlopen(url, timeout=2).status == 200)
    except OSError:
        return False


def test_the_curl_commands(served: tuple[int, int], tmp_path: Path) -> None:
    _, http_port = served
    script = _section("Calling layertap from curl", "bash")
    script = script.replace("localhost:8000", f"127.0.0.1:{http_port}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-eu", "-c", script],  # not pipefail: `| head` ends curl early by design
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == '{"ready":true}', lines[0]
    assert lines[1].startswith('{"models":') and "mobilenet_v2" in lines[1]
    assert '"inputs":[{"name":"images","datatype":"BYTES"' in lines[2]
    assert lines[3].startswith('{"model":"mobilenet_v2","results":[{"features.18":')
    assert lines[4].startswith('{"model_name":"mobilenet_v2","model_version":"1"')
    assert '"shape":[1,1280]' in lines[4]


@pytest.mark.slow
def test_the_triton_client_code(served: tuple[int, int], triton_python: Path) -> None:
    port, http_port = served
    code = _section("Calling layertap from Triton/KServe clients", "python")
    code = code.replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{http_port}")
    done = subprocess.run(
        [str(triton_python), "-c", code], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = done.stdout.splitlines()
    assert re.fullmatch(r"\d+ nodes; \(1, 1280\)", first), first
    assert int(first.split()[0]) > 50
    assert second == "(1, 160)"
