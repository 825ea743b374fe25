"""Extractor builds are budgeted per client (issue 17, server/build_budget.py): a client cycling
through node sets gets RESOURCE_EXHAUSTED (retryable) once it has used its builds of the minute,
counted in layertap_extractor_builds_refused_total, while node sets already cached are never
refused and another client still has its own builds."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import RunningServer, start_server

from layertap.server.build_budget import BuildBudget
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

RETRYABLE = ("layertap-retryable", "true")
REFUSED = "layertap_extractor_builds_refused_total"
NODE_SETS = ["stem.0", "stem.1", "pools.0", "pools.1", "pools.2", "head"]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        warmup=True,
        log_level="ERROR",
        max_builds_per_client_per_minute=3,
        models=(
            ModelConfig(
                name="tiny",
                factory="factories:tiny_net",
                weights="none",
                allow_random=True,
                input_size=(16, 16),
            ),
        ),
    )
    running = start_server(settings)
    try:
        yield running
    finally:
        running.stop()


def _request(node: str) -> pb.ExtractRequest:
    x = np.zeros((3, 16, 16), np.float32)
    tensor = pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes())
    return pb.ExtractRequest(model="tiny", images=[pb.Image(tensor=tensor)], nodes=[node])


def _refused(server: RunningServer) -> float:
    assert server.server.metrics is not None
    return server.server.metrics.registry.get_sample_value(REFUSED, {"model": "tiny"}) or 0.0


def test_a_client_cycling_node_sets_runs_out_of_builds_and_others_do_not(
    server: RunningServer,
) -> None:
    stub = server.stub()  # one connection: one client
    cached = server.server.runtime.model("tiny").extractors
    warmed = [key for key in cached]
    assert warmed, "warm-up cached the default node set"
    for node in NODE_SETS[:3]:  # three new node sets: three builds
        stub.Extract(_request(node), timeout=60)
    with pytest.raises(grpc.RpcError) as info:
        stub.Extract(_request(NODE_SETS[3]), timeout=60)
    error = info.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "max_builds_per_client_per_minute" in (error.details() or "")
    assert RETRYABLE in tuple(error.trailing_metadata() or ())
    assert _refused(server) == 1
    # node sets with an extractor cached cost no build: still served
    for node in NODE_SETS[:3]:
        assert len(stub.Extract(_request(node), timeout=60).results) == 1
    # another client (its own connection) has builds of its own
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        other = pb_grpc.FeatureServiceStub(channel)
        assert len(other.Extract(_request(NODE_SETS[3]), timeout=60).results) == 1
    finally:
        channel.close()
    assert _refused(server) == 1


def test_a_node_set_served_once_costs_no_more_builds_even_without_its_own_extractor(
    server: RunningServer,
) -> None:
    """In shared batches the worker builds the union of the batch's node sets, so a set can be
    served many times without an extractor of its own: once served, it is known, not new (the
    soak at concurrency 64 found every such request charged a build)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")  # a fresh client, 3 builds
    try:
        stub = pb_grpc.FeatureServiceStub(channel)
        stub.Extract(_request("pools.2"), timeout=60)
        cache = server.server.runtime.model("tiny").extractors
        for _ in range(10):  # more than its 3 builds, each one a build on the worker
            cache.pop(("pools.2",), None)  # as if only unions had been built for it
            assert len(stub.Extract(_request("pools.2"), timeout=60).results) == 1
    finally:
        channel.close()


def test_the_bucket_refills_evenly_and_says_when() -> None:
    budget = BuildBudget(per_minute=6)  # one build every 10 s
    assert [budget.take("a", 0.0) for _ in range(6)] == [0.0] * 6
    assert budget.take("a", 0.0) == pytest.approx(10.0)
    assert budget.take("a", 5.0) == pytest.approx(5.0)
    assert budget.take("a", 10.0) == 0.0  # one token back after 10 s
    assert budget.take("b", 10.0) == 0.0  # every client has its own bucket
    assert BuildBudget(per_minute=0).take("a", 0.0) == 0.0  # 0: no bound
