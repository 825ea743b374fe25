"""The HTTP API's settings and gates: `http` off leaves gRPC alone, `http_host` / `http_port`
bind where asked, TLS and mutual TLS are the gRPC port's, HTTP and gRPC share admission's
max_concurrent_rpcs (an HTTP call past it is 429 with Retry-After, retryable), a client that
goes away cancels its call, and the HTTP calls count in the metrics as `http:<Method>`."""

from __future__ import annotations

import base64
import io
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import factories
import numpy as np
import pytest
from conftest import probe_config, requests_counted, start_server
from test_security import Pki, pki  # noqa: F401  (the certificates fixture)

from layertap.client import FeatureClient
from layertap.server.settings import Settings

TINY = probe_config("p", 32)
BODY = json.dumps(
    {
        "inputs": [
            {"name": "pixels", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": [7] * 192}
        ],
        "outputs": [{"name": "conv"}],
        "parameters": {"pool": "avg"},
    }
).encode()


def _get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, context=context, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post(url: str, body: bytes, timeout: float = 60) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def test_http_off_leaves_grpc_serving() -> None:
    running = start_server(Settings(port=0, metrics=False, http=False, models=(TINY,)))
    try:
        assert running.server.http is None
        x = np.zeros((8, 8, 3), np.uint8)
        with FeatureClient(running.target) as client:
            assert client.extract([x], model="p", nodes="conv", pool="avg")["conv"].shape == (1, 4)
    finally:
        running.stop()


def test_http_host_and_port_bind_where_asked() -> None:
    port = _free_port("127.0.0.2")
    settings = Settings(
        port=0, metrics=False, http_host="127.0.0.2", http_port=port, models=(TINY,)
    )
    running = start_server(settings)
    try:
        assert running.server.http is not None and running.server.http.port == port
        assert _get(f"http://127.0.0.2:{port}/v2/health/live") == (200, {"live": True})
        with pytest.raises(urllib.error.URLError):  # not on the gRPC host's address
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=5)
    finally:
        running.stop()


def test_https_is_the_grpc_ports_tls(pki: Pki) -> None:  # noqa: F811
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    running = start_server(Settings(port=0, metrics=False, models=(TINY,), **tls))
    try:
        assert running.server.http is not None
        port = running.server.http.port
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        assert _get(f"https://127.0.0.1:{port}/v2/health/live", trusted) == (200, {"live": True})
        with pytest.raises(urllib.error.URLError):  # a certificate it does not trust
            urllib.request.urlopen(
                f"https://127.0.0.1:{port}/v2", context=ssl.create_default_context(), timeout=5
            )
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext is refused
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2", timeout=5)
    finally:
        running.stop()


def test_mutual_tls_needs_a_client_certificate(pki: Pki) -> None:  # noqa: F811
    tls = {
        "tls_cert": str(pki.server_cert),
        "tls_key": str(pki.server_key),
        "tls_client_ca": str(pki.ca),
    }
    running = start_server(Settings(port=0, metrics=False, models=(TINY,), **tls))
    try:
        assert running.server.http is not None
        url = f"https://127.0.0.1:{running.server.http.port}/v2/health/live"
        anonymous = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            urllib.request.urlopen(url, context=anonymous, timeout=5).read()
        known = ssl.create_default_context(cafile=str(pki.ca))
        known.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        assert _get(url, known) == (200, {"live": True})
    finally:
        running.stop()


def test_http_and_grpc_share_the_unary_slots_and_metrics() -> None:
    model = probe_config("held", 32)
    running = start_server(Settings(port=0, models=(model,), max_concurrent_rpcs=1))
    release = factories.hold_probe("held")
    try:
        x = np.zeros((8, 8, 3), np.uint8)
        done: list[Any] = []

        def occupy() -> None:  # one gRPC Extract holds the only slot while the forward waits
            with FeatureClient(running.target, retries=0) as client:
                done.append(client.extract([x], model="held", nodes="conv", pool="avg"))

        thread = threading.Thread(target=occupy)
        thread.start()
        deadline = time.monotonic() + 30
        assert running.server.admission is not None
        while running.server.admission.unary < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        url = f"{running.http_url}/v2/models/held/infer"
        status, headers, body = _post(url, BODY)
        assert status == 429 and headers.get("Retry-After") == "1", body
        assert "max_concurrent_rpcs" in body["error"]
        release.set()
        thread.join(30)
        assert done and done[0]["conv"].shape == (1, 4)
        status, headers, body = _post(url, BODY)
        assert status == 200 and body["outputs"][0]["shape"] == [1, 4], body
        assert len(headers.get("x-request-id", "")) == 32
        counted = requests_counted(running.server.metrics_port)
        assert counted[("http:ModelInfer", "RESOURCE_EXHAUSTED")] == 1
        assert counted[("http:ModelInfer", "OK")] == 1
        assert counted[("Extract", "OK")] == 1
    finally:
        release.set()
        running.stop()


def test_a_client_that_leaves_cancels_its_call(tmp_path: Path) -> None:
    model = probe_config("gone", 32)
    running = start_server(Settings(port=0, metrics=False, models=(model,)))
    release = factories.hold_probe("gone")
    try:
        assert running.server.http is not None
        port = running.server.http.port
        with socket.create_connection(("127.0.0.1", port)) as conn:
            head = (
                f"POST /v2/models/gone/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}"
                "\r\nContent-Type: application/json\r\n\r\n"
            )
            conn.sendall(head.encode() + BODY)
            time.sleep(0.5)  # the first forward is held; a second call waits in the queue
        deadline = time.monotonic() + 10
        assert running.server.admission is not None
        while running.server.admission.unary and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running.server.admission.unary == 0  # the call ended with its connection
    finally:
        release.set()
        running.stop()


def test_a_trickled_body_gives_its_slot_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from layertap.server import http_v2

    monkeypatch.setattr(http_v2, "BODY_TIMEOUT_S", 0.5)
    running = start_server(Settings(port=0, metrics=False, models=(TINY,)))
    try:
        assert running.server.http is not None and running.server.admission is not None
        with socket.create_connection(("127.0.0.1", running.server.http.port)) as conn:
            head = (
                "POST /v2/models/p/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                "Content-Type: application/json\r\n\r\n{"
            )
            conn.sendall(head.encode())  # 999 bytes never come
            conn.settimeout(10)
            reply = conn.recv(65536).decode()
        assert reply.startswith("HTTP/1.1 400"), reply[:200]
        assert "did not arrive within 0.5 s" in reply
        assert running.server.admission.unary == 0
        x = np.zeros((8, 8, 3), np.uint8)  # the server goes on
        with FeatureClient(running.target) as client:
            assert client.extract([x], model="p", nodes="conv", pool="avg")["conv"].shape == (1, 4)
    finally:
        running.stop()


def test_v1_extract_nodes_repeat_or_separate_by_commas() -> None:
    running = start_server(Settings(port=0, metrics=False, models=(TINY,)))
    try:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buf, "PNG")
        body = json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()]}).encode()
        for query in ("nodes=conv&nodes=relu", "nodes=conv,relu"):
            url = f"{running.http_url}/v1/extract?model=p&{query}&pool=avg"
            status, _, reply = _post(url, body)
            assert status == 200, reply
            assert list(reply["results"][0]) == ["conv", "relu"], query
    finally:
        running.stop()
