"""Process control: each benchmarked server as a subprocess in its own process group, started,
waited on until it answers, and stopped by its own id."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench.config import LayertapOptions
from bench.inputs import ModelSpec

ROOT = Path(__file__).resolve().parents[1]  # servers run here: `python -m bench.<server>`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A server subprocess in its own process group, stopped by its own id."""

    def __init__(
        self, name: str, cmd: list[str], logdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.http_port: int | None = None  # layertap's HTTP API, where the server has one
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.popen = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}; log tail:\n{self.tail()}"
            )

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()


def wait_until(check: Callable[[], bool], proc: Proc, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s; log tail:\n{proc.tail()}")


def layertap_supports(flag: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "layertap.client", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    ).stdout
    return flag in out


@contextlib.contextmanager
def layertap_server(
    specs: Sequence[ModelSpec],
    device: str,
    logdir: Path,
    options: LayertapOptions,
    extra: Sequence[str] = (),
) -> Iterator[tuple[Proc, str, str]]:
    """`layertap serve` with a TOML config; yields (process, target, metrics URL). `extra`
    flags come after the options' own (a phase's setting under test)."""
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        f"metrics_port = {metrics_port}",
        'log_level = "WARNING"',
        "shutdown_delay_s = 0",
        "shutdown_grace_s = 2",
        "",
    ]
    for spec in specs:
        lines += [
            "[[models]]",
            f'name = "{spec.arch}"',
            f'arch = "{spec.arch}"',
            f'weights = "{spec.weights or "none"}"',
            "allow_random = true",
            *options.model_lines(),
            "",
        ]
    config = logdir / f"layertap-{port}.toml"
    config.write_text("\n".join(lines))
    cmd = [sys.executable, "-m", "layertap.client", "serve", "--config", str(config)]
    # a flag, over any LAYERTAP_HTTP_PORT in the environment (the tests set one)
    cmd += ["--device", device, "--http-port", str(http_port), *options.args, *extra]
    proc = Proc(f"layertap-{port}", cmd, logdir, dict(options.env))
    proc.http_port = http_port
    target = f"127.0.0.1:{port}"
    try:
        from layertap.client import FeatureClient

        with FeatureClient(target, timeout=5, retries=0) as client:

            def ready() -> bool:
                models = client.list_models()
                return bool(models) and all(m.ready for m in models)

            wait_until(ready, proc, 600, "layertap")
        yield proc, target, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        proc.stop()


def _peer_cmd(module: str, spec: ModelSpec, device: str, port: int) -> list[str]:
    """A peer server's command line: the same model, node and weights as layertap's."""
    return [
        sys.executable, "-m", module, "--arch", spec.arch, "--node", spec.node,
        "--weights", spec.weights or "none", "--port", str(port), "--device", device,
    ]  # fmt: skip


@contextlib.contextmanager
def naive_server(
    spec: ModelSpec, device: str, logdir: Path, threads: int
) -> Iterator[tuple[Proc, str]]:
    port = free_port()
    cmd = [*_peer_cmd("bench.naive_server", spec, device, port), "--threads", str(threads)]
    proc = Proc(f"naive-{port}", cmd, logdir)
    target = f"127.0.0.1:{port}"
    try:
        # the naive server binds its port after loading the model and then says so
        wait_until(lambda: "ready on" in proc.tail(5), proc, 600, "naive server")
        yield proc, target
    finally:
        proc.stop()


@contextlib.contextmanager
def litserve_server(
    spec: ModelSpec, device: str, logdir: Path, max_batch: int, timeout_s: float
) -> Iterator[tuple[Proc, int]]:
    port = free_port()
    cmd = _peer_cmd("bench.litserve_app", spec, device, port)
    cmd += ["--max-batch-size", str(max_batch), "--batch-timeout", str(timeout_s)]
    proc = Proc(f"litserve-{port}", cmd, logdir)
    try:

        def ready() -> bool:
            url = f"http://127.0.0.1:{port}/health"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200 and r.read().strip().strip(b'"') == b"ok"

        wait_until(ready, proc, 600, "LitServe")
        yield proc, port
    finally:
        proc.stop()
