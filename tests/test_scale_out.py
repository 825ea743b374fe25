"""Several replicas behind one client: round robin spreads the calls, retries survive a replica
that disappears mid-run, and the client's channel options say so.

Three real servers bind 127.0.0.1, 127.0.0.2 and 127.0.0.3 (Linux routes all of 127/8 to the
loopback interface), each with its own /metrics on the same address; the client sees them as
one ``ipv4:`` target, the way a headless Kubernetes Service's ``dns:///`` name resolves to
every pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, photo, save_random_weights, start_server

from layertap.client import AsyncFeatureClient, FeatureClient, FeatureServiceError
from layertap.client._options import (
    KEEPALIVE_TIME_MS,
    channel_options,
    channel_target,
    service_config,
)
from layertap.server.settings import ModelConfig, Settings

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
N_CALLS = 300
STOP_AFTER = 100
WORKERS = 8
NODE = "layer1"
SERVICE = "layertap.v1.FeatureService"


# --- replicas --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_weights("resnet18", tmp_path_factory.mktemp("scale") / "r18.pth")


@pytest.fixture(scope="module")
def image() -> bytes:
    """A small real photo (chelsea, 300x451 JPEG): decode + layer1 of resnet18 stays cheap."""
    return encode(photo("chelsea"))


@contextlib.contextmanager
def replicas(weights: Path) -> Iterator[list[RunningServer]]:
    """Three layertap servers on three loopback addresses; stops whichever still run."""
    running: list[RunningServer] = []
    try:
        for host in HOSTS:
            settings = Settings(
                host=host,
                port=0,
                metrics=True,
                metrics_port=0,
                metrics_host=host,
                warmup=False,
                log_level="ERROR",
                models=(ModelConfig(name="r18", arch="resnet18", weights=str(weights)),),
            )
            running.append(start_server(settings, ready_timeout=120))
        yield running
    finally:
        for server in running:
            if server.thread.is_alive():
                server.stop()


def target_of(servers: list[RunningServer], scheme: str = "ipv4:") -> str:
    return scheme + ",".join(f"{h}:{s.port}" for h, s in zip(HOSTS, servers, strict=True))


def scraped_ok(host: str, server: RunningServer) -> int:
    """layertap_requests_total{method="Extract",code="OK"} from the replica's /metrics page."""
    url = f"http://{host}:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("layertap_requests_total{")
            and 'method="Extract"' in line
            and 'code="OK"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def registry_count(server: RunningServer, code: str) -> int:
    """The same counter read in-process: still readable once the replica (and /metrics) stopped."""
    assert server.server.metrics is not None
    value = server.server.metrics.registry.get_sample_value(
        "layertap_requests_total", {"method": "Extract", "model": "r18", "code": code}
    )
    return int(value or 0)


# --- the scale-out run -----------------------------------------------------------------------
def test_round_robin_spreads_calls_and_retries_survive_a_stopped_replica(
    r18_weights: Path, image: bytes
) -> None:
    with replicas(r18_weights) as servers, FeatureClient(target_of(servers), timeout=30) as client:

        def extract(_: int) -> np.ndarray:
            return client.extract(image, model="r18", nodes=NODE, pool="avg")[NODE]

        reference = extract(0)
        assert reference.shape == (1, 64)
        base = [scraped_ok(h, s) for h, s in zip(HOSTS, servers, strict=True)]

        # phase 1: every replica takes a share, and the shares add up to what was sent
        with ThreadPoolExecutor(WORKERS) as pool:
            first = list(pool.map(extract, range(N_CALLS)))
        for out in first:
            np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)
        shares = [scraped_ok(h, s) - b for h, s, b in zip(HOSTS, servers, base, strict=True)]
        assert sum(shares) == N_CALLS, shares
        assert all(share > N_CALLS // 5 for share in shares), shares

        # phase 2: replica 2 is stopped hard (grace 0: in-flight calls are cancelled, the port
        # closes) once STOP_AFTER calls have completed; every call must still succeed
        base = [scraped_ok(h, s) for h, s in zip(HOSTS, servers, strict=True)]
        victim = servers[1]
        cancelled_before = registry_count(victim, "CANCELLED")
        completed = 0
        lock = threading.Lock()
        reached = threading.Event()

        def extract_counting(i: int) -> np.ndarray:
            nonlocal completed
            out = extract(i)
            with lock:
                completed += 1
                if completed == STOP_AFTER:
                    reached.set()
            return out

        with ThreadPoolExecutor(WORKERS) as pool:
            futures: list[Future[np.ndarray]] = [
                pool.submit(extract_counting, i) for i in range(N_CALLS)
            ]
            assert reached.wait(60), "the first calls of phase 2 did not complete"
            victim.stop()
            assert not victim.thread.is_alive()
            at_stop = registry_count(victim, "OK")
            second = [f.result(timeout=60) for f in futures]  # raises if any call failed

        assert len(second) == N_CALLS
        for out in second:
            np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)
        victim_share = registry_count(victim, "OK") - base[1]
        assert registry_count(victim, "OK") == at_stop  # nothing more reached the stopped one
        assert 0 < victim_share < N_CALLS // 2
        survivors = [scraped_ok(HOSTS[i], servers[i]) - base[i] for i in (0, 2)]
        assert victim_share + sum(survivors) == N_CALLS, (victim_share, survivors)
        assert all(share > (N_CALLS - victim_share) // 4 for share in survivors), survivors
        # the calls that were running on the victim were cancelled there and answered elsewhere
        in_flight_at_stop = registry_count(victim, "CANCELLED") - cancelled_before
        assert 0 <= in_flight_at_stop <= WORKERS


def test_pick_first_sends_everything_to_one_replica_and_plain_lists_work(
    r18_weights: Path, image: bytes
) -> None:
    """Why round robin is the default: with gRPC's pick_first one replica takes every call.
    The plain comma list (no ``ipv4:``) is the same target, for both clients."""
    with replicas(r18_weights) as servers:
        plain = target_of(servers, scheme="")
        base = [scraped_ok(h, s) for h, s in zip(HOSTS, servers, strict=True)]
        with FeatureClient(plain, load_balancing=None, timeout=30) as client:
            for _ in range(30):
                client.extract(image, model="r18", nodes=NODE, pool="avg")
        shares = [scraped_ok(h, s) - b for h, s, b in zip(HOSTS, servers, base, strict=True)]
        assert sorted(shares) == [0, 0, 30], shares

        async def run_async() -> None:
            async with AsyncFeatureClient(plain, timeout=30) as client:
                sem = asyncio.Semaphore(WORKERS)

                async def one() -> None:
                    async with sem:
                        out = await client.extract(image, model="r18", nodes=NODE, pool="avg")
                        assert out[NODE].shape == (1, 64)

                await asyncio.gather(*(one() for _ in range(60)))

        base = [scraped_ok(h, s) for h, s in zip(HOSTS, servers, strict=True)]
        asyncio.run(run_async())
        shares = [scraped_ok(h, s) - b for h, s, b in zip(HOSTS, servers, base, strict=True)]
        assert sum(shares) == 60 and all(share >= 10 for share in shares), shares


def test_without_retries_the_unreachable_replica_fails_the_call() -> None:
    """retries=0 and pick_first against a port nobody listens on: one attempt, UNAVAILABLE."""
    with FeatureClient("127.0.0.1:1", retries=0, load_balancing=None, timeout=5) as client:
        with pytest.raises(FeatureServiceError) as info:
            client.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


# --- channel options (no server) -------------------------------------------------------------
def _options_dict(options: list[tuple[str, Any]]) -> dict[str, Any]:
    as_dict = dict(options)
    assert len(as_dict) == len(options), "duplicate channel option"
    return as_dict


def test_default_options_carry_round_robin_and_keepalive_but_no_grpc_retry_policy() -> None:
    opts = _options_dict(channel_options(1 << 20, load_balancing="round_robin", retries=4))
    config = json.loads(opts["grpc.service_config"])
    assert config == {"loadBalancingConfig": [{"round_robin": {}}]}
    # the SDK retries calls itself (client/_retry.py); a gRPC policy too would multiply attempts
    assert "grpc.enable_retries" not in opts  # gRPC's transparent retries stay on
    assert "grpc.per_rpc_retry_buffer_size" not in opts
    assert opts["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS == 30_000
    assert opts["grpc.keepalive_timeout_ms"] == 10_000
    # no pings without calls: a default gRPC server would count those as abuse (GOAWAY)
    assert opts["grpc.keepalive_permit_without_calls"] == 0
    assert opts["grpc.max_send_message_length"] == opts["grpc.max_receive_message_length"]
    assert opts["grpc.service_config_disable_resolution"] == 1


def test_load_balancing_none_and_zero_retries_remove_them() -> None:
    no_lb = _options_dict(channel_options(1 << 20, load_balancing=None, retries=2))
    assert "loadBalancingConfig" not in json.loads(no_lb.get("grpc.service_config", "{}"))
    no_retry = _options_dict(channel_options(1 << 20, load_balancing="round_robin", retries=0))
    assert json.loads(no_retry["grpc.service_config"]) == {
        "loadBalancingConfig": [{"round_robin": {}}]
    }
    assert "grpc.per_rpc_retry_buffer_size" not in no_retry
    assert "grpc.enable_retries" not in no_retry  # gRPC's transparent retries stay on
    neither = _options_dict(channel_options(1 << 20, load_balancing=None, retries=0))
    assert "grpc.service_config" not in neither
    assert service_config("pick_first", 0) == {"loadBalancingConfig": [{"pick_first": {}}]}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"retries": 11}, ValueError),
        ({"retries": -1}, ValueError),
        ({"retries": True}, TypeError),
        ({"retries": 1.0}, TypeError),
        ({"load_balancing": "Round Robin"}, ValueError),
        ({"load_balancing": ""}, ValueError),
        ({"load_balancing": 3}, ValueError),
    ],
)
def test_bad_load_balancing_or_retries_are_refused(kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        FeatureClient("127.0.0.1:1", **kwargs)
    with pytest.raises(error):
        AsyncFeatureClient("127.0.0.1:1", **kwargs)


def test_clients_open_their_channel_with_these_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    real_channel = grpc.insecure_channel

    def fake_channel(target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        seen.append((target, _options_dict(options)))
        return real_channel(target, options=options)

    monkeypatch.setattr(grpc, "insecure_channel", fake_channel)
    FeatureClient("127.0.0.1:5001,127.0.0.2:5002").close()
    FeatureClient("dns:///layertap-headless.ns.svc:50051", load_balancing=None, retries=0).close()
    (plain, plain_opts), (dns, dns_opts) = seen
    assert plain == "ipv4:127.0.0.1:5001,127.0.0.2:5002"
    assert "round_robin" in plain_opts["grpc.service_config"]
    assert "retryPolicy" not in plain_opts["grpc.service_config"]
    assert dns == "dns:///layertap-headless.ns.svc:50051"
    assert "grpc.service_config" not in dns_opts

    captured: list[tuple[str, dict[str, Any]]] = []

    def fake_aio_channel(target: str, options: list[tuple[str, Any]]) -> Any:
        captured.append((target, _options_dict(options)))
        return mock.MagicMock()  # the stub only asks it for method callables

    monkeypatch.setattr(grpc.aio, "insecure_channel", fake_aio_channel)
    client = AsyncFeatureClient("[::1]:5001,[::1]:5002", retries=1)
    client._get_stub()
    ((address, options),) = captured
    assert address == "ipv6:[::1]:5001,[::1]:5002"
    assert json.loads(options["grpc.service_config"]) == {
        "loadBalancingConfig": [{"round_robin": {}}]
    }
    assert client.retries == 1


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("layertap:50051", "layertap:50051"),
        ("dns:///layertap-headless.ns.svc:50051", "dns:///layertap-headless.ns.svc:50051"),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("10.0.0.1:1, 10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("[::1]:1,[fd00::2]:2", "ipv6:[::1]:1,[fd00::2]:2"),
    ],
)
def test_channel_target(target: str, expected: str) -> None:
    assert channel_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "a.example:1,b.example:2",  # names: use dns:/// (one name, many addresses)
        "10.0.0.1,10.0.0.2:2",  # a port is missing
        "10.0.0.1:1,10.0.0.2:99999",
        "10.0.0.1:1,[::1]:2",  # IPv4 and IPv6 cannot share one gRPC address list
        "::1:1,::1:2",  # IPv6 needs brackets
        "10.0.0.1:1,",
    ],
)
def test_channel_target_refuses_lists_grpc_cannot_take(target: str) -> None:
    with pytest.raises(ValueError, match="target"):
        channel_target(target)
