"""An answer larger than max_message_bytes, unary and inside ExtractStream.

The size that counts is the serialised message gRPC will send, not the tensors' bytes: keys
and node names repeat for every image, so a request with long aliases can make an answer whose
tensors are small but whose message is over the limit. Such an answer is refused with
RESOURCE_EXHAUSTED and a message that names max_message_bytes, the exact size and what to
change; inside a stream it is that item's ItemError and the stream goes on (gRPC itself would
have ended the whole stream with "Sent message larger than max", dropping every other item).

The exact size is computed without serialising (`responses.extract_response_size`,
`responses.stream_item_size`): it is checked here against protobuf's own ByteSize on responses
of many shapes, with field lengths on both sides of each varint width.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, start_server

from layertap.server.errors import LimitExceeded
from layertap.server.responses import (
    check_message_size,
    extract_response_size,
    named_tensor_size,
    stream_item_size,
    tensor_size,
)
from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

SIZE = 64
MAX_MESSAGE = 96 * 1024
N_IMAGES = 64
# the tiny model's NCHW nodes; pooled (avg) each output is 6 float32 = 24 bytes of tensor
NODES = ["stem.0", "stem.1", "pools.0", "pools.1", "pools.2"]
KEY_CHARS = 350  # 64 images x 5 outputs x ~400 bytes: ~130 KB of message, ~8 KB of tensors
IMAGE = encode(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8), "PNG")


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        max_message_bytes=MAX_MESSAGE,
        max_parameter_bytes=1,
        max_images_per_request=N_IMAGES,
        max_wait_ms=2,
        log_level="ERROR",
        models=(
            ModelConfig(
                name="tiny",
                factory="factories:tiny_net",
                kwargs={"width": 6},
                weights="none",
                allow_random=True,
                input_size=(SIZE, SIZE),
            ),
        ),
    )
    running = start_server(settings)
    yield running
    running.stop()


def long_keys_request(key_chars: int = KEY_CHARS) -> pb.ExtractRequest:
    """Small tensors, long output keys repeated on every image's outputs."""
    return pb.ExtractRequest(
        model="tiny",
        images=[pb.Image(encoded=IMAGE)] * N_IMAGES,
        nodes=NODES,
        aliases={n: f"{n}-" + "k" * key_chars for n in NODES},
        output=pb.OutputOptions(pool=pb.POOLING_AVG),
    )


def small_request() -> pb.ExtractRequest:
    return pb.ExtractRequest(model="tiny", images=[pb.Image(encoded=IMAGE)], nodes=["pools"])


def test_the_request_is_small_and_its_tensors_fit() -> None:
    """The premise: the request itself is well under the limit, and so are the tensors."""
    request = long_keys_request()
    assert request.ByteSize() < MAX_MESSAGE // 2
    assert N_IMAGES * len(NODES) * 6 * 4 < MAX_MESSAGE // 8


def test_unary_answer_over_the_limit_by_its_keys_is_refused_with_the_setting(
    server: RunningServer,
) -> None:
    with server.channel() as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Extract(long_keys_request(), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = str(err.value.details())
        # before: gRPC's own "Sent message larger than max (135406 vs. 98304)", after the work
        assert f"max_message_bytes={MAX_MESSAGE}" in details, details
        assert "aliases" in details, details
        # the same request with short keys fits and is answered
        ok = stub.Extract(long_keys_request(key_chars=4), timeout=60)
        assert len(ok.results) == N_IMAGES
        assert ok.ByteSize() <= MAX_MESSAGE


def test_stream_item_over_the_limit_is_its_own_error_and_the_stream_goes_on(
    server: RunningServer,
) -> None:
    messages = [
        pb.ExtractStreamRequest(id="before", request=small_request()),
        pb.ExtractStreamRequest(id="big", request=long_keys_request()),
        pb.ExtractStreamRequest(id="after", request=small_request()),
        pb.ExtractStreamRequest(id="big-2", request=long_keys_request()),
        pb.ExtractStreamRequest(id="last", request=small_request()),
    ]
    with server.channel() as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        # before the fix this raised: the stream ended RESOURCE_EXHAUSTED ("Sent message
        # larger than max") and the items after the big one were never answered
        answers = {a.id: a for a in stub.ExtractStream(iter(messages), timeout=60)}
    assert set(answers) == {"before", "big", "after", "big-2", "last"}
    for item_id in ("before", "after", "last"):
        assert answers[item_id].WhichOneof("result") == "response", answers[item_id].error
        assert len(answers[item_id].response.results) == 1
    for item_id in ("big", "big-2"):
        error = answers[item_id].error
        assert answers[item_id].WhichOneof("result") == "error"
        assert error.code_name == "RESOURCE_EXHAUSTED"
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert f"max_message_bytes={MAX_MESSAGE}" in error.message, error.message


# --------------------------------------------------------------------------- exact sizes
# lengths on both sides of each varint width (1, 2, 3 and 4 bytes)
EDGES = [0, 1, 127, 128, 16383, 16384, (1 << 21) - 1, 1 << 21]


def _response(rng: random.Random, data_lengths: list[int]) -> pb.ExtractResponse:
    results = []
    for _ in range(rng.randint(0, 4)):
        outputs = []
        for _ in range(rng.randint(0, 3)):
            length = rng.choice(data_lengths)
            key = "k" * rng.choice([0, 1, 127, 128, 300]) + rng.choice(["", "é", "🧠"])
            outputs.append(
                pb.NamedTensor(
                    key=key,
                    node=rng.choice(["", "pools", "layer4.1.relu_1", "n" * 200]),
                    tensor=pb.Tensor(
                        dtype=rng.choice(["", "float32", "bfloat16"]),
                        shape=rng.choice([[], [0], [6], [2, 130, 1 << 14, 1 << 21, 1 << 28]]),
                        data=b"\x01" * length,
                        layout=rng.choice(["", "NC", "NCHW"]),
                    ),
                )
            )
        results.append(pb.ImageResult(outputs=outputs))
    metadata = pb.ExtractMetadata(
        model="tiny",
        nodes=[pb.ResolvedNode(key="k", requested="pools", node="pools")],
        timings=pb.Timings(queue_ms=rng.choice([0.0, 1.5]), total_ms=3.0),
        batch_size=rng.choice([0, 1, 300]),
    )
    return pb.ExtractResponse(results=results, metadata=metadata)


def _output_sizes(response: pb.ExtractResponse) -> list[list[int]]:
    """Each image's NamedTensor sizes, computed from the fields (the data only by length)."""
    return [
        [
            named_tensor_size(
                o.key,
                o.node,
                tensor_size(o.tensor.dtype, o.tensor.shape, len(o.tensor.data), o.tensor.layout),
            )
            for o in result.outputs
        ]
        for result in response.results
    ]


def test_computed_size_equals_protobuf_byte_size() -> None:
    rng = random.Random(17)
    for case in range(300):
        lengths = EDGES if case % 10 == 0 else EDGES[:6]
        response = _response(rng, lengths)
        size = extract_response_size(_output_sizes(response), response.metadata.ByteSize())
        assert size == response.ByteSize(), case
        for item_id in ("a", "x" * 127, "x" * 128, "ü" * 700):
            wrapped = pb.ExtractStreamResponse(id=item_id, response=response)
            assert stream_item_size(item_id, size) == wrapped.ByteSize(), (case, len(item_id))


def test_every_field_of_the_answer_is_counted() -> None:
    """A new field in these messages must be added to the size computation (and here)."""
    fields = {
        m.DESCRIPTOR.name: {f.name for f in m.DESCRIPTOR.fields}
        for m in (pb.Tensor, pb.NamedTensor, pb.ImageResult, pb.ExtractResponse)
    }
    assert fields == {
        "Tensor": {"dtype", "shape", "data", "layout"},
        "NamedTensor": {"key", "node", "tensor"},
        "ImageResult": {"outputs"},
        "ExtractResponse": {"results", "metadata"},
    }
    assert {f.name for f in pb.ExtractStreamResponse.DESCRIPTOR.fields} == {
        "id",
        "response",
        "error",
    }


def test_the_limit_is_the_message_size_exactly() -> None:
    check_message_size(1000, 1000)  # a message of exactly max_message_bytes is sent
    with pytest.raises(LimitExceeded, match="max_message_bytes=1000"):
        check_message_size(1001, 1000)
