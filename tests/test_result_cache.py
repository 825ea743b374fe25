"""The result cache (server/result_cache.py, `result_cache_bytes`): a repeated image is answered
byte for byte from the cache with no decode, no forward and no memory reservation; anything that
changes the result misses; the bound evicts the least recently used; the bypass neither reads
nor stores; errors are never stored; and it is off by default.

The models are probe nets (tests/factories.py): the probe's log lists every image a forward saw
(its largest value, which each raw test image sets with its `marker`), so "no forward" is read
from the worker itself, and the server's own counters say "no decode".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import factories
import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, photo, probe_config, start_server

from layertap.client import FeatureClient
from layertap.client.cli import main
from layertap.server.requests import ExtractJob
from layertap.server.result_cache import (
    ENTRY_OVERHEAD,
    PER_IMAGE,
    TENSOR_OVERHEAD,
    UNKEYED,
    image_keys,
)
from layertap.server.settings import ModelConfig, Settings
from layertap.server.spec import ImageInput, NodeSpec, OutputSpec, PostOp
from layertap.v1 import layertap_pb2 as pb

SIZE = 32
FAIL_ABOVE = 50.0  # the probe of "rc-a" raises on an input value above this
HITS = "layertap_result_cache_hits_total"
MISSES = "layertap_result_cache_misses_total"
EVICTIONS = "layertap_result_cache_evictions_total"
BYTES = "layertap_result_cache_bytes"
ENTRIES = "layertap_result_cache_entries"
IMAGES = "layertap_images_total"
DECODES = "layertap_stage_duration_seconds_count"


def _probe(name: str, **probe: object) -> ModelConfig:
    return probe_config(name, SIZE, probe)


def _raw(marker: float, seed: int = 0) -> pb.Image:
    """A float32 [1, 3, 32, 32] input whose largest value is `marker` (>= 1)."""
    x = np.random.default_rng(seed).uniform(-1, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    x.flat[0] = marker
    return pb.Image(tensor=pb.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes()))


def _jpeg(name: str = "astronaut", step: int = 8) -> pb.Image:
    return pb.Image(encoded=encode(np.ascontiguousarray(photo(name)[::step, ::step])))


def _request(
    model: str, images: list[pb.Image], nodes: tuple[str, ...] = ("mean",), **fields: Any
) -> pb.ExtractRequest:
    return pb.ExtractRequest(model=model, images=images, nodes=list(nodes), **fields)


def _seen(tag: str) -> list[float]:
    """The largest value of every image the probe of model `tag` saw in a forward."""
    return [m for e in factories.probe_log(tag) for m in e["max"]]  # type: ignore[attr-defined]


def _sample(server: RunningServer, name: str, **labels: str) -> float:
    assert server.server.metrics is not None
    return server.server.metrics.registry.get_sample_value(name, labels) or 0.0


def _counts(server: RunningServer, model: str) -> dict[str, float]:
    return {
        "hits": _sample(server, HITS, model=model),
        "misses": _sample(server, MISSES, model=model),
        "evictions": _sample(server, EVICTIONS, model=model),
        "images": _sample(server, IMAGES, model=model),
        "decodes": _sample(server, DECODES, stage="decode"),
        "bytes": _sample(server, BYTES),
        "entries": _sample(server, ENTRIES),
    }


def _changed(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


def _outputs(response: pb.ExtractResponse) -> list[bytes]:
    return [r.SerializeToString(deterministic=True) for r in response.results]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        result_cache_bytes=8 << 20,
        models=(_probe("rc-a", fail_above=FAIL_ABOVE), _probe("rc-b")),
    )
    running = start_server(settings)
    yield running
    running.stop()


# --- hits ---------------------------------------------------------------------------------
def test_a_repeated_image_is_answered_byte_for_byte_without_decode_or_forward(
    server: RunningServer,
) -> None:
    stub = server.stub()
    request = _request(
        "rc-a",
        [_jpeg("coffee")],
        nodes=("conv", "relu"),
        output=pb.OutputOptions(pool=pb.POOLING_GEM, gem_p=2.0, normalize=True),
    )
    seen = len(_seen("rc-a"))
    before = _counts(server, "rc-a")
    first = stub.Extract(request, timeout=60)
    after_first = _counts(server, "rc-a")
    assert len(_seen("rc-a")) == seen + 1  # computed once
    changed = _changed(before, after_first)
    assert changed["misses"] == 1 and changed["images"] == 1 and changed["decodes"] == 1
    assert changed["entries"] == 1 and "hits" not in changed
    row_size = ENTRY_OVERHEAD + sum(
        len(o.tensor.data) + TENSOR_OVERHEAD for o in first.results[0].outputs
    )
    assert changed["bytes"] == row_size  # the gauge follows what was stored

    second = stub.Extract(request, timeout=60)
    assert _outputs(second) == _outputs(first)
    assert len(_seen("rc-a")) == seen + 1  # no forward
    assert _changed(after_first, _counts(server, "rc-a")) == {"hits": 1}  # no decode, no image
    meta = second.metadata
    assert meta.batch_size == 0 and meta.timings.decode_ms == 0 and meta.timings.compute_ms == 0
    assert meta.weights_sha256 == first.metadata.weights_sha256 and meta.device


def test_only_the_images_not_held_are_computed_in_order(server: RunningServer) -> None:
    stub = server.stub()
    a, b, c = _raw(2.0, seed=1), _raw(3.0, seed=2), _raw(4.0, seed=3)
    alone = stub.Extract(_request("rc-a", [a]), timeout=60)
    seen = len(_seen("rc-a"))
    mixed = stub.Extract(_request("rc-a", [b, a, c]), timeout=60)
    assert sorted(_seen("rc-a")[seen:]) == [3.0, 4.0]  # a came from the cache
    assert _outputs(mixed)[1] == _outputs(alone)[0]
    again = stub.Extract(_request("rc-a", [c, b]), timeout=60)
    assert len(_seen("rc-a")) == seen + 2  # both held now
    assert _outputs(again) == [_outputs(mixed)[2], _outputs(mixed)[0]]


def test_an_alias_hits_and_names_the_output_its_own_way(server: RunningServer) -> None:
    stub = server.stub()
    image = _raw(5.0, seed=4)
    plain = stub.Extract(_request("rc-a", [image]), timeout=60)
    seen = len(_seen("rc-a"))
    aliased = stub.Extract(
        pb.ExtractRequest(model="rc-a", images=[image], aliases={"mean": "vec"}), timeout=60
    )
    assert len(_seen("rc-a")) == seen  # output keys change no result: a hit
    assert [o.key for o in aliased.results[0].outputs] == ["vec"]
    assert aliased.results[0].outputs[0].tensor == plain.results[0].outputs[0].tensor


def test_a_hit_reserves_no_memory(server: RunningServer) -> None:
    """With the per-request cap at one image's estimate, two new images are refused; two held
    images pass (nothing reserved), and held + one new image reserves only the new one's."""
    pipeline = server.server.pipeline
    assert pipeline is not None
    job_inputs = [ImageInput(dtype="float32", shape=(1, 3, SIZE, SIZE), data=b"")]
    one = server.call(pipeline.estimate("rc-a", job_inputs, OutputSpec(), ["mean"], False, False))
    stub = server.stub()
    held = [_raw(6.0, seed=5), _raw(7.0, seed=6)]
    for image in held:
        stub.Extract(_request("rc-a", [image]), timeout=60)
    cap = pipeline.memory.per_request
    pipeline.memory.per_request = one.total
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Extract(_request("rc-a", [_raw(8.0, seed=7), _raw(9.0, seed=8)]), timeout=60)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_request_memory_bytes" in (refused.value.details() or "")
        assert len(stub.Extract(_request("rc-a", held), timeout=60).results) == 2
        partial = stub.Extract(_request("rc-a", [*held, _raw(8.0, seed=7)]), timeout=60)
        assert len(partial.results) == 3
    finally:
        pipeline.memory.per_request = cap


def test_an_extract_stream_item_hits_like_a_unary_call(server: RunningServer) -> None:
    stub = server.stub()
    image = _raw(10.0, seed=9)
    unary = stub.Extract(_request("rc-a", [image]), timeout=60)
    seen = len(_seen("rc-a"))
    hits = _sample(server, HITS, model="rc-a")
    items = [pb.ExtractStreamRequest(id=str(i), request=_request("rc-a", [image])) for i in "ab"]
    answers = list(stub.ExtractStream(iter(items), timeout=60))
    assert sorted(a.id for a in answers) == ["a", "b"]
    for answer in answers:
        assert _outputs(answer.response) == _outputs(unary)
    assert len(_seen("rc-a")) == seen
    assert _sample(server, HITS, model="rc-a") == hits + 2


# --- misses -------------------------------------------------------------------------------
GEM = pb.OutputOptions(pool=pb.POOLING_GEM)
# One change each to the base request (node conv, GeM, rc-a, the image as it is).
VARIANTS: dict[str, dict[str, Any]] = {
    "pool": {"output": pb.OutputOptions(pool=pb.POOLING_MAX)},
    "gem_p": {"output": pb.OutputOptions(pool=pb.POOLING_GEM, gem_p=4.0)},
    "normalize": {"output": pb.OutputOptions(pool=pb.POOLING_GEM, normalize=True)},
    "dtype": {"output": pb.OutputOptions(pool=pb.POOLING_GEM, dtype="float16")},
    "tta": {"output": pb.OutputOptions(pool=GEM.pool, tta=pb.TestTimeAugmentation(flip=True))},
    "nodes": {"nodes": ("relu",)},
    "native_resolution": {"native_resolution": True},
    "regions": {"regions": [pb.Box(x1=10, y1=10, x2=40, y2=40)]},
    "model": {"model": "rc-b"},
}


def _variant(index: int, fields: dict[str, Any]) -> pb.ExtractRequest:
    """The base request on an image of its own (a crop of chelsea per case), with `fields`."""
    image = pb.Image(encoded=encode(np.ascontiguousarray(photo("chelsea")[index::6, index::6])))
    image.regions.extend(fields.get("regions", []))
    return _request(
        fields.get("model", "rc-a"),
        [image],
        nodes=fields.get("nodes", ("conv",)),
        output=fields.get("output", GEM),
        native_resolution=fields.get("native_resolution", False),
    )


@pytest.mark.parametrize("what", list(VARIANTS))
def test_anything_that_changes_the_result_misses(server: RunningServer, what: str) -> None:
    """The base request is stored; the same image with one thing changed is computed (a miss
    and a forward on its model), then is a hit itself."""
    stub = server.stub()
    index = list(VARIANTS).index(what)
    base = _variant(index, {})
    stub.Extract(base, timeout=60)
    seen = len(_seen("rc-a"))
    stub.Extract(base, timeout=60)
    assert len(_seen("rc-a")) == seen  # the base is held
    variant = _variant(index, VARIANTS[what])
    model = variant.model
    misses = _sample(server, MISSES, model=model)
    seen = len(_seen(model))
    first = stub.Extract(variant, timeout=60)
    assert _sample(server, MISSES, model=model) == misses + 1, what
    assert len(_seen(model)) > seen, f"{what}: no forward"
    seen = len(_seen(model))
    assert _outputs(stub.Extract(variant, timeout=60)) == _outputs(first)
    assert len(_seen(model)) == seen, f"{what}: the variant itself was not stored"


# --- bypass and errors --------------------------------------------------------------------
def test_the_bypass_neither_reads_nor_stores(server: RunningServer) -> None:
    image = _raw(11.0, seed=10)
    tensor = np.frombuffer(image.tensor.data, np.float32).reshape(1, 3, SIZE, SIZE)
    before = _counts(server, "rc-a")
    with FeatureClient(server.target) as client:
        bypassed = client.extract(tensor, model="rc-a", nodes="mean", bypass_result_cache=True)
        assert _seen("rc-a").count(11.0) == 1
        changed = _changed(before, _counts(server, "rc-a"))
        assert "hits" not in changed and "misses" not in changed and "entries" not in changed
        stored = client.extract(tensor, model="rc-a", nodes="mean")  # a miss: nothing was stored
        assert _seen("rc-a").count(11.0) == 2
        hits = _sample(server, HITS, model="rc-a")
        again = client.extract(tensor, model="rc-a", nodes="mean", bypass_result_cache=True)
        assert _seen("rc-a").count(11.0) == 3  # computed although held: not looked up
        assert _sample(server, HITS, model="rc-a") == hits
        assert client.extract(tensor, model="rc-a", nodes="mean")["mean"].tobytes() == (
            stored["mean"].tobytes()
        )
    assert _seen("rc-a").count(11.0) == 3
    assert bypassed["mean"].tobytes() == again["mean"].tobytes() == stored["mean"].tobytes()
    with FeatureClient(server.target) as client:
        many = client.extract_many([tensor], model="rc-a", nodes="mean", bypass_result_cache=True)
        assert len(list(many)) == 1
    assert _seen("rc-a").count(11.0) == 4  # held, yet computed: the bulk call bypassed too


def test_the_cli_flag_bypasses_in_both_modes(server: RunningServer, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "rocket.jpg").write_bytes(_jpeg("rocket").encoded)
    one = ["--target", server.target, "extract", str(folder / "rocket.jpg"), "--model", "rc-a"]
    one += ["-n", "mean"]
    assert main(one) == 0
    seen = len(_seen("rc-a"))
    assert main(one) == 0
    assert len(_seen("rc-a")) == seen  # held
    assert main([*one, "--bypass-result-cache"]) == 0
    assert len(_seen("rc-a")) == seen + 1
    bulk = ["--target", server.target, "extract", str(folder), "--model", "rc-a", "-n", "mean"]
    bulk += ["--no-progress", "-o"]
    assert main([*bulk, str(tmp_path / "held.npz")]) == 0  # its probe image, then a hit
    seen = len(_seen("rc-a"))
    assert main([*bulk, str(tmp_path / "fresh.npz"), "--bypass-result-cache"]) == 0
    assert len(_seen("rc-a")) == seen + 1  # the probe image held, the photo computed


def test_errors_are_never_stored(server: RunningServer) -> None:
    stub = server.stub()
    failing = _request("rc-a", [_raw(FAIL_ABOVE + 1, seed=11)])
    bad = _request("rc-a", [pb.Image(encoded=b"\xff\xd8 not a jpeg")])
    entries = _sample(server, ENTRIES)
    for attempt in (1, 2):
        with pytest.raises(grpc.RpcError):
            stub.Extract(failing, timeout=60)
        assert _seen("rc-a").count(FAIL_ABOVE + 1) == attempt  # it ran again: not stored
        misses = _sample(server, MISSES, model="rc-a")
        with pytest.raises(grpc.RpcError) as refused:
            stub.Extract(bad, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _sample(server, MISSES, model="rc-a") == misses + 1  # looked up, missed again
    assert _sample(server, ENTRIES) == entries


# --- the bound, and off by default --------------------------------------------------------
ROW = ENTRY_OVERHEAD + TENSOR_OVERHEAD + 4 * 4  # one image's `mean` output: 4 float32


@pytest.fixture(scope="module")
def small_cache() -> Iterator[RunningServer]:
    running = start_server(
        Settings(port=0, result_cache_bytes=3 * ROW + ROW // 2, models=(_probe("rc-small"),))
    )
    yield running
    running.stop()


def test_the_byte_bound_evicts_the_least_recently_used(small_cache: RunningServer) -> None:
    stub = small_cache.stub()
    images = {m: _raw(m, seed=int(m)) for m in (2.0, 3.0, 4.0, 5.0)}

    def extract(*markers: float) -> None:
        for m in markers:
            stub.Extract(_request("rc-small", [images[m]]), timeout=60)

    extract(2.0, 3.0, 4.0)
    assert _sample(small_cache, BYTES) == 3 * ROW and _sample(small_cache, ENTRIES) == 3
    assert _sample(small_cache, EVICTIONS, model="rc-small") == 0
    extract(2.0)  # a hit: 2 becomes the most recently used, 3 the least
    extract(5.0)  # a fourth row does not fit: 3 goes
    assert _sample(small_cache, EVICTIONS, model="rc-small") == 1
    assert _sample(small_cache, BYTES) == 3 * ROW and _sample(small_cache, ENTRIES) == 3
    seen = len(_seen("rc-small"))
    extract(2.0, 4.0, 5.0)
    assert len(_seen("rc-small")) == seen  # all held
    extract(3.0)
    assert _seen("rc-small")[seen:] == [3.0]  # evicted, so computed again
    # a row larger than the whole cache is served but not stored, and evicts nothing
    evictions = _sample(small_cache, EVICTIONS, model="rc-small")
    big = _request("rc-small", [images[2.0]], nodes=("conv",))
    for _ in range(2):
        stub.Extract(big, timeout=60)
    assert _seen("rc-small")[-2:] == [2.0, 2.0]
    assert _sample(small_cache, EVICTIONS, model="rc-small") == evictions
    assert _sample(small_cache, BYTES) == 3 * ROW


def test_off_by_default() -> None:
    assert Settings().result_cache_bytes == 0
    running = start_server(Settings(port=0, models=(_probe("rc-off"),)))
    try:
        request = _request("rc-off", [_raw(2.0)])
        stub = running.stub()
        first, second = (stub.Extract(request, timeout=60) for _ in range(2))
        assert _outputs(first) == _outputs(second)
        assert _seen("rc-off").count(2.0) == 2  # both computed (the rest: warm-up)
        for name in (HITS, MISSES):
            assert _sample(running, name, model="rc-off") == 0
        assert _sample(running, ENTRIES) == 0
    finally:
        running.stop()


# --- the key ------------------------------------------------------------------------------
NODE = NodeSpec("relu", (1, 4, SIZE, SIZE), "float32", "NCHW", "call_module", "ReLU")
JOB = ExtractJob(
    model="m",
    plan=[("relu", "relu")],
    specs=[NODE],
    nodes=("relu",),
    spec=OutputSpec(),
    concat_key="",
    inputs=[ImageInput(encoded=b"jpeg bytes")],
    regions=[[]],
    native=False,
    priority=0,
)
# A different value of every field of the key's request part: a new ExtractJob or OutputSpec
# field fails the coverage checks below until it is listed here (or in UNKEYED, with why).
OTHER_JOB: dict[str, Any] = {
    "model": "m2",
    "nodes": ("conv", "relu"),
    "spec": OutputSpec(pool="avg"),
    "concat_key": "descriptor",
    "native": True,
}
OTHER_SPEC: dict[str, Any] = {
    "pool": "gem",
    "gem_p": 2.0,
    "normalize": True,
    "dtype": "float16",
    "post": (PostOp("l2"),),
    "concat": True,
    "rmac_levels": 2,
    "flip": True,
    "scales": (1.0, 0.5),
    "roi_size": 5,
}
OTHER_IMAGE: dict[str, ImageInput] = {
    "other bytes": ImageInput(encoded=b"jpeg bytez"),
    "raw": ImageInput(dtype="uint8", shape=(2, 5, 1), data=b"jpeg bytes"),
    "raw dtype": ImageInput(dtype="float32", shape=(1, 1, 10, 1), data=b"jpeg bytes"),
    "raw shape": ImageInput(dtype="uint8", shape=(5, 2, 1), data=b"jpeg bytes"),
}


def _key(job: ExtractJob = JOB, sha: str = "abc", preprocessing: object = "p") -> bytes:
    (key,) = image_keys(job, sha, preprocessing)
    return key


def test_every_field_of_the_job_and_its_options_is_in_the_key_or_named_unkeyed() -> None:
    fields = {f.name for f in dataclasses.fields(ExtractJob)}
    assert fields - PER_IMAGE - UNKEYED == set(OTHER_JOB), "list the new field in OTHER_JOB"
    assert {f.name for f in dataclasses.fields(OutputSpec)} == set(OTHER_SPEC)
    keys = {_key()}
    for name, value in OTHER_JOB.items():
        keys.add(_key(dataclasses.replace(JOB, **{name: value})))
    for name, value in OTHER_SPEC.items():
        keys.add(_key(dataclasses.replace(JOB, spec=OutputSpec(**{name: value}))))
    keys |= {_key(sha="abd"), _key(preprocessing="q")}
    assert len(keys) == 1 + len(OTHER_JOB) + len(OTHER_SPEC) + 2


def test_the_image_part_of_the_key() -> None:
    keys = {_key()}
    for image in OTHER_IMAGE.values():
        keys.add(_key(dataclasses.replace(JOB, inputs=[image])))
    keys.add(_key(dataclasses.replace(JOB, regions=[[(0.0, 0.0, 4.0, 4.0)]])))
    assert len(keys) == 2 + len(OTHER_IMAGE)
    # equal requests, equal keys; fields that change no result leave it alone
    same = dataclasses.replace(
        JOB,
        plan=[("alias", "relu")],
        specs=[NODE, NODE],
        priority=1,
        bypass_result_cache=True,
        inputs=[ImageInput(encoded=bytes(bytearray(b"jpeg bytes")))],
    )
    assert _key(same) == _key()
    two = dataclasses.replace(JOB, inputs=JOB.inputs * 2, regions=[[], []])
    assert len(set(image_keys(two, "abc", "p"))) == 1
