"""GetParameters against a real server: values equal the weights file's state_dict entries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import RunningServer, start_server

from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

LIMIT = 3 * 1024 * 1024  # max_parameter_bytes of the test server


@pytest.fixture(scope="module")
def server(resnet18_weights: Path) -> Iterator[RunningServer]:
    running = start_server(
        Settings(
            port=0,
            log_level="ERROR",
            max_parameter_bytes=LIMIT,
            models=(
                ModelConfig(name="resnet18", arch="resnet18", weights=str(resnet18_weights)),
                ModelConfig(name="broken", factory="factories:no_such_factory", weights="none"),
            ),
        )
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def state_dict(resnet18_weights: Path) -> dict[str, torch.Tensor]:
    return torch.load(resnet18_weights, weights_only=True)  # type: ignore[no-any-return]


def get(server: RunningServer, *names: str, dtype: str = "") -> pb.GetParametersResponse:
    request = pb.GetParametersRequest(model="resnet18", names=names, dtype=dtype)
    return server.stub().GetParameters(request, timeout=60)  # type: ignore[no-any-return]


def error(server: RunningServer, request: pb.GetParametersRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        server.stub().GetParameters(request, timeout=60)
    return info.value


def as_array(t: pb.Tensor) -> np.ndarray:
    data = np.frombuffer(t.data, {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}[t.dtype])
    if t.dtype == "bfloat16":  # the top 16 bits of a float32
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.reshape(tuple(t.shape)).astype(np.float32)


def test_values_equal_the_state_dict(server: RunningServer, state_dict: dict) -> None:
    names = ["fc.weight", "conv1.weight", "bn1.running_mean", "layer1.0.bn1.num_batches_tracked"]
    response = get(server, *names)
    assert response.model == "resnet18"
    assert [p.key for p in response.parameters] == names
    for p in response.parameters:
        assert p.node == p.key and p.tensor.dtype == "float32" and p.tensor.layout == ""
        want = state_dict[p.key].to(torch.float32).numpy()
        assert tuple(p.tensor.shape) == want.shape
        np.testing.assert_array_equal(as_array(p.tensor), want)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)]
)
def test_dtypes(server: RunningServer, state_dict: dict, dtype: str, torch_dtype: object) -> None:
    [p] = get(server, "layer2.0.conv1.weight", dtype=dtype).parameters
    assert p.tensor.dtype == dtype
    want = state_dict["layer2.0.conv1.weight"].to(torch_dtype).to(torch.float32).numpy()
    np.testing.assert_array_equal(as_array(p.tensor), want)


def test_module_paths_expand_in_module_order(server: RunningServer, state_dict: dict) -> None:
    response = get(server, "fc.bias", "layer1.0.bn1", "fc", "conv1.weight", "layer1.0.bn1.bias")
    assert [p.key for p in response.parameters] == [
        "fc.bias",
        "layer1.0.bn1.weight",  # the module's own parameters (not its buffers), in its order
        "layer1.0.bn1.bias",
        "fc.weight",  # fc.bias came first and is not repeated
        "conv1.weight",
    ]
    for p in response.parameters:
        np.testing.assert_array_equal(as_array(p.tensor), state_dict[p.key].numpy())


@pytest.mark.parametrize(
    ("request_", "code", "fragments"),
    [
        (
            pb.GetParametersRequest(model="resnet18", names=["layer1.0.conv9.weight"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'layer1.0.conv9.weight'", "closest:", "layer1.0.conv1.weight", "DescribeModel"],
        ),
        (
            pb.GetParametersRequest(model="resnet18", names=[]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["no names", "DescribeModel"],
        ),
        (
            pb.GetParametersRequest(model="resnet18", names=["fc.weight", ""]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["names[1] is empty"],
        ),
        (
            pb.GetParametersRequest(model="resnet18", names=["layer1"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'layer1'", "no parameters of its own"],
        ),
        (
            pb.GetParametersRequest(model="resnet18", names=["fc.weight"], dtype="float64"),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'float64'", "float32, float16, bfloat16"],
        ),
        (
            # 512*512*3*3 float32 = 9437184 bytes, over the 3 MiB limit
            pb.GetParametersRequest(model="resnet18", names=["layer4.1.conv2.weight"]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ["9437184 bytes", f"max_parameter_bytes={LIMIT}"],
        ),
        (
            # two 1.5 MiB+ tensors: each fits, together they do not
            pb.GetParametersRequest(model="resnet18", names=["layer3.0.conv2", "layer3.1.conv1"]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ["max_parameter_bytes"],
        ),
        (
            pb.GetParametersRequest(model="no-such-model", names=["fc.weight"]),
            grpc.StatusCode.NOT_FOUND,
            ["'no-such-model'", "available: resnet18, broken"],
        ),
        (
            pb.GetParametersRequest(model="broken", names=["fc.weight"]),
            grpc.StatusCode.UNAVAILABLE,
            ["failed to load"],
        ),
    ],
)
def test_errors(
    server: RunningServer,
    request_: pb.GetParametersRequest,
    code: grpc.StatusCode,
    fragments: list[str],
) -> None:
    err = error(server, request_)
    assert err.code() == code, err.details()
    for fragment in fragments:
        assert fragment in err.details(), err.details()


def test_half_precision_fits_where_float32_does_not(server: RunningServer) -> None:
    names = ("layer3.0.conv2", "layer3.1.conv1")  # 2 x 2359296 bytes as float32
    assert len(get(server, *names, dtype="float16").parameters) == 2
