"""Prometheus metrics of a real server: names and labels from docs/OPERATIONS.md, values after
real Extract calls, `promtool check metrics`, a real Prometheus scraping it, and metrics off.

Needs the Debian `prometheus` package (`prometheus` and `promtool` on PATH: run `make tools`);
these tests fail, never skip, when it is missing.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, photo, start_server
from prometheus_client.parser import text_string_to_metric_families

from layertap.client import FeatureClient, FeatureServiceError
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

R18 = ModelConfig(name="r18", arch="resnet18", weights="none", allow_random=True)
MOBILENET = ModelConfig(name="mobilenet_v2", arch="mobilenet_v2", weights="IMAGENET1K_V1")
MODELS = {"r18", "mobilenet_v2"}

# docs/OPERATIONS.md, section Metrics (the CUDA gauges only exist when serving on CUDA)
DOCUMENTED = {
    "layertap_build_info": "gauge",
    "layertap_requests_total": "counter",
    "layertap_request_duration_seconds": "histogram",
    "layertap_stage_duration_seconds": "histogram",
    "layertap_batch_size": "histogram",
    "layertap_queue_depth": "gauge",
    "layertap_requests_in_flight": "gauge",
    "layertap_images_total": "counter",
    "layertap_output_bytes_total": "counter",
    "layertap_extractor_cache_entries": "gauge",
    "layertap_extractor_cache_hits_total": "counter",
    "layertap_extractor_cache_misses_total": "counter",
    "layertap_extractor_cache_evictions_total": "counter",
    "layertap_extractor_build_seconds": "histogram",
    "layertap_compile_seconds_total": "counter",
    "layertap_compiles_pending": "gauge",
    "layertap_thread_cpu_seconds_total": "counter",
    "layertap_memory_reserved_bytes": "gauge",
    "layertap_model_memory_bytes": "gauge",
    "layertap_model_ready": "gauge",
}
LABEL_KEYS = {
    *("method", "model", "code", "stage", "le", "version", "torch", "torchvision", "device"),
    "role",  # layertap_thread_cpu_seconds_total: a thread role, from a fixed set
}
ROLES = {"event loop", "decode", "worker", "compile", "grpc core", "other"}
METHODS = {"ListModels", "DescribeModel", "Extract"}
# every RPC name is a bounded label value (clients may call the others too)
ALL_METHODS = {m.name for m in pb.DESCRIPTOR.services_by_name["FeatureService"].methods}
STAGES = {"queue", "decode", "compute", "encode"}
CODES = {c.name for c in grpc.StatusCode}
# What must never become a label value: node names, model names clients made up, image names.
FORBIDDEN = ("layer", "classifier", "features", "nope", "astronaut", "jpeg", "jpg", "png", "../")

Sample = tuple[str, dict[str, str], float]


# --- helpers -----------------------------------------------------------------------------
def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"`{tool}` is not on PATH: run `make tools` (installs Debian's prometheus)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics_port(running: RunningServer) -> int:
    port = running.server.metrics_port
    assert isinstance(port, int) and port > 0, f"server.metrics_port is {port!r}"
    return port


def fetch(url: str, timeout: float = 10) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode(), response.headers.get("Content-Type", "")


def page(running: RunningServer) -> str:
    return fetch(f"http://127.0.0.1:{metrics_port(running)}/metrics")[0]


def samples(text: str) -> list[Sample]:
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(snapshot: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    return sum(
        v for n, lab, v in snapshot if n == name and all(lab.get(k) == w for k, w in labels.items())
    )


def scrape(running: RunningServer) -> list[Sample]:
    return samples(page(running))


def listening_ports() -> set[tuple[str, int]]:
    """(hex local address, port) of every TCP socket this process listens on (Linux /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.rsplit(":", 1)
                found.add((address, int(port, 16)))
    return found


# 127.0.0.1, ::1 and ::ffff:127.0.0.1 as /proc/net shows them
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def model_bytes(arch: str) -> int:
    """Parameters + buffers of a torchvision model, as the docs define model_memory_bytes."""
    import torch
    import torchvision

    model = torchvision.models.get_model(arch, weights=None)
    tensors: Iterator[torch.Tensor] = itertools.chain(model.parameters(), model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# --- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = start_server(Settings(port=0, metrics_port=0, models=(R18, MOBILENET)))
    yield running
    running.stop()


# --- tests -------------------------------------------------------------------------------
def test_metrics_endpoint_is_loopback_prometheus_text(server: RunningServer) -> None:
    port = metrics_port(server)
    assert port != server.port
    text, content_type = fetch(f"http://127.0.0.1:{port}/metrics")
    assert content_type.startswith("text/plain"), content_type
    assert "# TYPE layertap_requests_total counter" in text
    mine = {p: a for a, p in listening_ports()}
    assert port in mine, f"nothing of ours listens on {port}: {sorted(mine)}"
    assert mine[port] in LOOPBACK, f"metrics bound to {mine[port]}, expected loopback (host)"


def test_every_documented_metric_has_its_type(server: RunningServer) -> None:
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", page(server), re.M))
    missing = {name: kind for name, kind in DOCUMENTED.items() if types.get(name) != kind}
    assert not missing, f"wrong or missing (name: documented type): {missing}; page has {types}"
    assert not any(name.startswith("layertap_cuda_") for name in types), "CUDA gauges on a CPU"
    for name, kind in types.items():
        if name.startswith("layertap_") and kind == "counter":
            assert name.endswith("_total"), name


def test_static_metrics(server: RunningServer) -> None:
    import torch
    import torchvision

    from layertap.server.metrics import layertap_version

    snap = scrape(server)
    info = [(lab, v) for n, lab, v in snap if n == "layertap_build_info"]
    assert info == [
        (
            {
                "version": layertap_version(),
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "device": "cpu",
            },
            1.0,
        )
    ], info
    for model in MODELS:
        assert value(snap, "layertap_model_ready", model=model) == 1, model
    assert value(snap, "layertap_model_ready", model="unknown") == 0

    r18 = value(snap, "layertap_model_memory_bytes", model="r18")
    params = 11_689_512  # resnet18
    assert 4 * params <= r18 <= 1.01 * model_bytes("resnet18"), r18
    assert r18 == pytest.approx(model_bytes("resnet18"), rel=0.01)
    mobilenet = value(snap, "layertap_model_memory_bytes", model="mobilenet_v2")
    assert mobilenet == pytest.approx(model_bytes("mobilenet_v2"), rel=0.01)
    assert value(snap, "layertap_queue_depth") == 0
    assert value(snap, "layertap_requests_in_flight", method="Extract") == 0


def test_extractor_cache_miss_then_hit(server: RunningServer) -> None:
    nodes = ["layer2.0.conv1", "layer3.1.bn2"]  # a node set nothing else asks for
    with FeatureClient(server.target) as client:
        s0 = scrape(server)
        client.extract(photo("astronaut"), model="r18", nodes=nodes, pool="avg")
        s1 = scrape(server)
        client.extract(photo("astronaut"), model="r18", nodes=nodes, pool="avg")
        s2 = scrape(server)

    def delta(a: list[Sample], b: list[Sample], name: str) -> float:
        return value(b, name, model="r18") - value(a, name, model="r18")

    assert delta(s0, s1, "layertap_extractor_cache_misses_total") == 1
    assert delta(s0, s1, "layertap_extractor_cache_hits_total") == 0
    assert delta(s0, s1, "layertap_extractor_cache_entries") == 1
    assert delta(s0, s1, "layertap_extractor_build_seconds_count") == 1
    assert delta(s0, s1, "layertap_extractor_build_seconds_sum") > 0
    assert delta(s1, s2, "layertap_extractor_cache_hits_total") == 1
    assert delta(s1, s2, "layertap_extractor_cache_misses_total") == 0
    assert delta(s1, s2, "layertap_extractor_cache_entries") == 0
    assert delta(s1, s2, "layertap_extractor_build_seconds_count") == 0
    assert value(s2, "layertap_extractor_cache_evictions_total", model="r18") == 0
    # the other model's cache is untouched by r18's requests
    for name in ("layertap_extractor_cache_hits_total", "layertap_extractor_cache_misses_total"):
        assert value(s2, name, model="mobilenet_v2") == value(s0, name, model="mobilenet_v2")


def test_requests_images_bytes_and_histograms(server: RunningServer) -> None:
    astronaut = photo("astronaut")
    expected: Counter[tuple[str, str, str]] = Counter()
    images: Counter[str] = Counter()
    out_bytes: Counter[str] = Counter()
    before = scrape(server)
    with FeatureClient(server.target) as client:
        for imgs, model, nodes, pool in [
            ([astronaut], "r18", "layer4", "avg"),
            ([astronaut, encode(astronaut)], "r18", ["layer1", "layer4"], None),
            ([encode(astronaut, "PNG")], "r18", "fc", None),
            ([astronaut], "mobilenet_v2", "classifier", None),
        ]:
            result = client.extract(imgs, model=model, nodes=nodes, pool=pool)
            expected["Extract", model, "OK"] += 1
            images[model] += len(imgs)
            out_bytes[model] += sum(a.nbytes for a in result.values())
        with pytest.raises(FeatureServiceError) as bad_node:
            client.extract(astronaut, model="r18", nodes="layer9")
        assert bad_node.value.code == grpc.StatusCode.INVALID_ARGUMENT
        expected["Extract", "r18", "INVALID_ARGUMENT"] += 1
        for name in ("nope", "nope/../../astronaut.jpg"):
            with pytest.raises(FeatureServiceError) as unknown:
                client.extract(astronaut, model=name, nodes="layer4")
            assert unknown.value.code == grpc.StatusCode.NOT_FOUND
            expected["Extract", "unknown", "NOT_FOUND"] += 1
        with pytest.raises(FeatureServiceError) as unknown:
            client.describe("nope")
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        expected["DescribeModel", "unknown", "NOT_FOUND"] += 1
        client.describe("r18")
        expected["DescribeModel", "r18", "OK"] += 1
        client.list_models()
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for (method, model, code), n in expected.items():
        got = delta("layertap_requests_total", method=method, model=model, code=code)
        assert got == n, f"requests_total{{{method},{model},{code}}}: {got}, expected {n}"
    assert delta("layertap_requests_total", method="ListModels", code="OK") == 1
    n_extract = sum(n for (method, _, _), n in expected.items() if method == "Extract")
    assert delta("layertap_request_duration_seconds_count", method="Extract") == n_extract
    assert delta("layertap_request_duration_seconds_sum", method="Extract") > 0
    assert delta("layertap_request_duration_seconds_count", method="DescribeModel") == 2
    assert delta("layertap_request_duration_seconds_count", method="ListModels") == 1
    for method in METHODS:
        inf = value(after, "layertap_request_duration_seconds_bucket", method=method, le="+Inf")
        assert inf == value(after, "layertap_request_duration_seconds_count", method=method)

    n_ok = sum(n for (m, _, code), n in expected.items() if m == "Extract" and code == "OK")
    for stage in STAGES:
        count = delta("layertap_stage_duration_seconds_count", stage=stage)
        assert count >= n_ok if stage in ("encode", "compute") else count >= sum(images.values())
        assert delta("layertap_stage_duration_seconds_sum", stage=stage) >= 0
    assert delta("layertap_stage_duration_seconds_sum", stage="compute") > 0

    for model in MODELS:
        assert delta("layertap_images_total", model=model) == images[model], model
        assert delta("layertap_output_bytes_total", model=model) == out_bytes[model], model
        assert delta("layertap_batch_size_sum", model=model) == images[model], model
        assert 1 <= delta("layertap_batch_size_count", model=model) <= images[model], model
    assert value(after, "layertap_queue_depth") == 0
    for method in METHODS:
        assert value(after, "layertap_requests_in_flight", method=method) == 0

    # Every label is bounded: known keys and values, never a node, a made-up model or an image.
    for name, labels, _ in after:
        for key, val in labels.items():
            assert not any(bad in val.lower() for bad in FORBIDDEN), (name, labels)
            assert len(val) <= 64, (name, labels)
            if name.startswith("layertap_"):
                assert key in LABEL_KEYS, (name, labels)
        if not name.startswith("layertap_"):
            continue
        assert labels.get("model", "r18") in {*MODELS, "unknown"}, (name, labels)
        assert labels.get("method", "Extract") in ALL_METHODS, (name, labels)
        assert labels.get("code", "OK") in CODES, (name, labels)
        assert labels.get("stage", "queue") in STAGES, (name, labels)
        assert labels.get("role", "other") in ROLES, (name, labels)


def test_in_flight_and_queue_depth_while_busy(server: RunningServer) -> None:
    """A 24-image request (3 forwards of 8): /metrics shows it in flight and images queued."""
    errors: list[BaseException] = []

    def big_request() -> None:
        try:
            with FeatureClient(server.target) as client:
                client.extract([photo("astronaut")] * 24, model="r18", nodes="layer4", pool="avg")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=big_request)
    thread.start()
    in_flight, queued = [], []
    while thread.is_alive():
        snap = scrape(server)
        in_flight.append(value(snap, "layertap_requests_in_flight", method="Extract"))
        queued.append(value(snap, "layertap_queue_depth"))
        time.sleep(0.01)
    thread.join()
    assert not errors, errors
    assert max(in_flight) >= 1, in_flight
    assert max(queued) >= 1, queued
    snap = scrape(server)
    assert value(snap, "layertap_requests_in_flight", method="Extract") == 0
    assert value(snap, "layertap_queue_depth") == 0


def test_promtool_accepts_the_page(server: RunningServer) -> None:
    promtool = need("promtool")
    with FeatureClient(server.target) as client:  # histograms with observations, error codes
        client.extract(photo("astronaut"), model="r18", nodes="layer4", pool="avg")
        with pytest.raises(FeatureServiceError):
            client.extract(photo("astronaut"), model="nope", nodes="layer4")
    text = page(server)
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, (
        f"promtool check metrics exited {check.returncode}:\n{check.stdout}{check.stderr}"
    )


def test_real_prometheus_scrapes_exact_counts(server: RunningServer, tmp_path: Path) -> None:
    prometheus = need("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: layertap\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port(server)}']\n"
    )
    log_path = tmp_path / "prometheus.log"
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"{api}/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(fetch(url, timeout=5)[0])
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    n = 7
    series = 'sum(layertap_requests_total{method="Extract",model="r18",code="OK"})'
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    seen: list[Any] = []
    try:
        deadline = time.monotonic() + 60
        while True:  # Prometheus up
            try:
                if fetch(f"http://127.0.0.1:{port}/-/ready", timeout=2)[0]:
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert proc.poll() is None, f"prometheus exited {proc.returncode}"
            assert time.monotonic() < deadline, "prometheus not ready within 60 s"
            time.sleep(0.5)

        start = value(
            scrape(server), "layertap_requests_total", method="Extract", model="r18", code="OK"
        )
        with FeatureClient(server.target) as client:
            for _ in range(n):
                client.extract(photo("astronaut"), model="r18", nodes="layer3", pool="max")
        want = start + n
        while True:  # the scraped counter reaches exactly start + n
            result = query(series)
            got = float(result[0]["value"][1]) if result else None
            seen.append(got)
            if got == want:
                break
            assert got is None or got <= want, f"Prometheus says {got}, expected {want}"
            assert proc.poll() is None, f"prometheus exited {proc.returncode}"
            assert time.monotonic() < deadline, f"Prometheus never said {want}; saw {seen}"
            time.sleep(0.5)
        up = query('up{job="layertap"}')
        assert [float(r["value"][1]) for r in up] == [1.0], up
        ready = query("layertap_model_ready")
        assert {r["metric"]["model"]: float(r["value"][1]) for r in ready} == {
            "r18": 1.0,
            "mobilenet_v2": 1.0,
        }, ready
    except BaseException:
        try:
            targets = fetch(f"{api}/targets", timeout=5)[0]
        except (urllib.error.URLError, OSError) as exc:
            targets = repr(exc)
        print(f"prometheus targets: {targets}\nquery results seen: {seen}")
        print("prometheus log:\n" + log_path.read_text()[-6000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)


def test_metrics_off_listens_only_for_grpc_and_http() -> None:
    """With metrics off the server listens on its gRPC port and (unless `http = false`) its
    HTTP port, nothing else."""
    before = listening_ports()
    running = start_server(Settings(port=0, metrics=False, warmup=False, models=(R18,)))
    try:
        assert running.server.metrics_port in (None, 0), running.server.metrics_port
        assert running.server.http is not None
        new = {port for _, port in listening_ports() - before}
        want = {running.port, running.server.http.port}
        assert new == want, f"new listening ports {new}, gRPC and HTTP are {want}"
        with FeatureClient(running.target) as client:  # serving works without metrics
            out = client.extract(photo("astronaut"), model="r18", nodes="layer4", pool="avg")
        assert out["layer4"].shape == (1, 512)
        assert np.isfinite(out["layer4"]).all()
    finally:
        running.stop()
