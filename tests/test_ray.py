"""layertap.ray on a local Ray cluster (2 CPUs): Extractor over a real mobilenet_v2 server (1,000
distinct JPEGs made from real photos, equal to FeatureClient.extract_many, no row lost or
duplicated), over a two-replica fleet with one replica stopped mid-run, and LocalExtractor (its
own in-process server) against the server's vectors. The batch handling (input columns, numpy
and pandas batches, the error policy, the fleet target) is checked by calling an Extractor
directly, without Ray.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import factories
import numpy as np
import pandas as pd
import pytest
import ray
from conftest import MOBILENET, RunningServer, photo, probe_config, serving, start_server

from layertap.client import FeatureClient, FeatureServiceError
from layertap.ray import Extractor, LocalExtractor, fleet_target
from layertap.server.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray's own

N_IMAGES = 1000
NODES = ["features.6", "features.13"]
OPTIONS: dict[str, Any] = dict(model="m", nodes=NODES, pool="gem", normalize=True)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "china", "grace_hopper")


# --- data ------------------------------------------------------------------------------------
def augmented_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEGs from the real photos: random crops (40-100 % of each side), flips,
    resizes (longer side 96-288 px) and JPEG qualities; distinct by content hash."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(photo(name)) for name in PHOTOS]
    out: list[bytes] = []
    seen: set[str] = set()
    while len(out) < n:
        im = sources[len(out) % len(sources)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = rng.uniform(96, 288) / max(cw, ch)
        crop = crop.resize((max(16, round(cw * scale)), max(16, round(ch * scale))))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=int(rng.integers(70, 96)))
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(data)
    return out


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return augmented_jpegs(N_IMAGES)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serving(Settings(port=0, log_level="ERROR", models=(MOBILENET,))) as running:
        yield running


@pytest.fixture(scope="module")
def reference(server: RunningServer, jpegs: list[bytes]) -> dict[int, dict[str, np.ndarray]]:
    """FeatureClient.extract_many's answer for every image, by id."""
    with FeatureClient(server.target) as client:
        answers = client.extract_many(list(enumerate(jpegs)), **OPTIONS, progress=False)
        return {i: {k: r[k][0] for k in r} for i, r in answers}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=400 * 1024 * 1024,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def items(jpegs: list[bytes]) -> list[dict[str, Any]]:
    return [{"id": i, "image": data} for i, data in enumerate(jpegs)]


def by_id(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    ids = [int(row["id"]) for row in rows]
    assert len(ids) == len(set(ids)), "a row came back twice"
    return {int(row["id"]): row for row in rows}


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=what)


# --- through Ray -------------------------------------------------------------------------------
def test_a_thousand_photos_through_ray_equal_extract_many(
    cluster: None,
    server: RunningServer,
    jpegs: list[bytes],
    reference: dict[int, dict[str, np.ndarray]],
) -> None:
    started = time.perf_counter()
    ds = ray.data.from_items(items(jpegs), override_num_blocks=8).map_batches(
        Extractor,
        fn_constructor_kwargs=dict(target=server.target, **OPTIONS, drop_input=True),
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.25,
    )
    rows = by_id(ds.take_all())
    elapsed = time.perf_counter() - started
    assert sorted(rows) == list(range(N_IMAGES)), "rows lost"
    assert set(rows[0]) == {"id", *NODES}  # the image column dropped, one column per key
    for i, row in rows.items():
        for key in NODES:
            assert row[key].shape == reference[i][key].shape
            assert_same(row[key], reference[i][key], f"image {i}, {key}")
    # the photos are really different: (almost) no two descriptors alike
    distinct = {np.round(row["features.13"], 3).tobytes() for row in rows.values()}
    assert len(distinct) > 0.99 * N_IMAGES
    print(f"\n{N_IMAGES} images through Ray in {elapsed:.1f} s")


def test_a_replica_stopped_mid_run_loses_and_repeats_nothing(
    cluster: None, jpegs: list[bytes]
) -> None:
    """Two replicas (127.0.0.1 and 127.0.0.2, the same seeded probe model, a forward of 20 ms),
    one Extractor target listing both; replica A is stopped (grace 0: its open streams end and
    their unanswered items are resent) once it has computed 40 images. Every row comes back
    once, with B's answer."""
    n = 400
    data = jpegs[:n]
    settings = dict(port=0, log_level="ERROR", http=False, metrics=False, max_batch_size=4)
    model = {
        tag: probe_config("p", 32, probe={"tag": f"ray-{tag}", "delay_s": 0.02}) for tag in "ab"
    }

    a = start_server(Settings(host="127.0.0.1", models=(model["a"],), **settings))
    try:
        with serving(Settings(host="127.0.0.2", models=(model["b"],), **settings)) as b:
            rows, stopped_at, on_b = run_and_stop(a, b, data)
            with FeatureClient(f"127.0.0.2:{b.port}") as client:
                want = client.extract(data, model="p", nodes="mean")["mean"]
    finally:
        if a.thread.is_alive():
            a.stop()
    assert 40 <= stopped_at < n, stopped_at  # A was stopped mid-run
    assert sorted(rows) == list(range(n))  # every row once (by_id refuses repeats)
    assert on_b >= n - stopped_at, (on_b, stopped_at)  # B took everything A left
    for i, row in rows.items():
        assert_same(row["mean"], want[i], f"image {i}")
    print(f"\nreplica A computed {stopped_at} images before it was stopped, B {on_b}")


def computed(tag: str) -> int:
    """Images the probe model tagged ``tag`` has run forwards on (in this process)."""
    return sum(int(e["batch"]) for e in factories.probe_log(tag))


def run_and_stop(
    a: RunningServer, b: RunningServer, data: list[bytes]
) -> tuple[dict[int, dict[str, Any]], int, int]:
    """The Ray run over replicas ``a`` and ``b``, ``a`` stopped once it has computed 40 images;
    returns the rows by id, what ``a`` had computed when stopped and what ``b`` computed."""
    warm = {"a": computed("ray-a"), "b": computed("ray-b")}
    stopped_at: list[int] = []

    def stop_a() -> None:
        deadline = time.monotonic() + 120
        while computed("ray-a") - warm["a"] < 40 and time.monotonic() < deadline:
            time.sleep(0.005)
        a.stop()
        stopped_at.append(computed("ray-a") - warm["a"])

    watcher = threading.Thread(target=stop_a, daemon=True)
    watcher.start()
    target = [f"127.0.0.1:{a.port}", f"127.0.0.2:{b.port}"]
    ds = ray.data.from_items(items(data), override_num_blocks=8).map_batches(
        Extractor,
        fn_constructor_kwargs=dict(target=target, model="p", nodes="mean", drop_input=True),
        batch_size=25,
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.25,
    )
    rows = by_id(ds.take_all())
    watcher.join(10)
    assert stopped_at and not a.thread.is_alive(), "replica A was not stopped"
    return rows, stopped_at[0], computed("ray-b") - warm["b"]


def test_local_extractor_gives_the_servers_vectors(
    cluster: None, jpegs: list[bytes], reference: dict[int, dict[str, np.ndarray]]
) -> None:
    n = 24
    ds = ray.data.from_items(items(jpegs[:n])).map_batches(
        LocalExtractor,
        fn_constructor_kwargs=dict(
            config={"name": "m", "arch": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
            settings={"compile_budget_s": 0, "torch_threads": 1},
            nodes=NODES,
            pool="gem",
            normalize=True,
        ),
        batch_format="pandas",
        batch_size=12,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.25,
    )
    rows = by_id(ds.take_all())
    assert sorted(rows) == list(range(n))
    for i, row in rows.items():
        assert row["image"] == jpegs[i]  # kept: drop_input is off
        for key in NODES:
            assert_same(row[key], reference[i][key], f"image {i}, {key}")


# --- batches, called directly --------------------------------------------------------------------
@pytest.fixture(scope="module")
def extractor(server: RunningServer) -> Iterator[Extractor]:
    with Extractor(server.target, **OPTIONS) as e:
        yield e


def test_numpy_batches_of_bytes_paths_and_arrays(
    extractor: Extractor,
    server: RunningServer,
    jpegs: list[bytes],
    reference: dict[int, dict[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    from PIL import Image

    blob = np.empty(3, dtype=object)
    blob[:] = jpegs[:3]
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Path(paths[-1]).write_bytes(jpegs[i])
    # read_binary_files(include_paths=True): "bytes" is preferred to "path"
    out = extractor({"bytes": blob, "path": np.array(paths)})
    assert list(out) == ["bytes", "path", *NODES]
    for key in NODES:
        assert out[key].shape == (3, *reference[0][key].shape) and out[key].dtype == np.float32
        assert_same(out[key], np.stack([reference[i][key] for i in range(3)]), key)
    by_path = Extractor(server.target, **OPTIONS, column="path")({"path": np.array(paths)})
    assert_same(by_path[NODES[0]], out[NODES[0]], "paths")
    # read_images: decoded uint8 HWC arrays, one [N, H, W, 3] array when they share a size
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(j)).resize((120, 90))) for j in jpegs[:3]])
    out = extractor({"image": decoded})
    with FeatureClient(server.target) as client:
        want = client.extract(list(decoded), **OPTIONS)
    for key in NODES:
        assert_same(out[key], want[key], key)


def test_pandas_batches_and_a_renamed_output(
    server: RunningServer, jpegs: list[bytes], reference: dict[int, dict[str, np.ndarray]]
) -> None:
    frame = pd.DataFrame({"id": [7, 8], "image": jpegs[7:9]})
    with Extractor(
        server.target,
        model="m",
        nodes={"features.6": "emb"},
        pool="gem",
        normalize=True,
        drop_input=True,
    ) as e:
        out = e(frame)
    assert list(out.columns) == ["id", "emb"]
    assert list(frame.columns) == ["id", "image"]  # the input batch is left as it was
    for row, i in enumerate((7, 8)):
        assert_same(out["emb"].iloc[row], reference[i]["features.6"], f"image {i}")


def test_errors_null_marks_the_failed_rows_and_raise_names_the_row(
    server: RunningServer, jpegs: list[bytes], reference: dict[int, dict[str, np.ndarray]]
) -> None:
    blob = np.empty(4, dtype=object)
    blob[:] = [jpegs[0], b"not an image", jpegs[2], b""]
    with Extractor(server.target, **OPTIONS, errors="null") as e:
        out = e({"image": blob})
        assert [m.split(":")[0] for m in out["error"]] == [
            "",
            "INVALID_ARGUMENT",
            "",
            "INVALID_ARGUMENT",
        ]
        for key in NODES:
            assert out[key].shape[0] == 4 and out[key].dtype == np.float32
            assert_same(out[key][0], reference[0][key], key)
            assert_same(out[key][2], reference[2][key], key)
            assert np.isnan(out[key][[1, 3]]).all()
    # a batch in which every image fails, before any succeeded in this actor: the shapes come
    # from a blank image
    with Extractor(server.target, **OPTIONS, errors="null") as fresh:
        bad = np.empty(2, dtype=object)
        bad[:] = [b"junk", b"more junk"]
        out = fresh({"image": bad})
        for key in NODES:
            assert out[key].shape == (2, *reference[0][key].shape) and np.isnan(out[key]).all()
    with Extractor(server.target, **OPTIONS) as e, pytest.raises(FeatureServiceError) as info:
        e({"image": blob})
    assert info.value.code is not None and info.value.code.name == "INVALID_ARGUMENT"
    assert info.value.details.startswith("row 1 of a batch of 4: ")


def test_bad_arguments_fail_at_construction_and_outputs_never_replace_columns(
    server: RunningServer, jpegs: list[bytes]
) -> None:
    with pytest.raises(TypeError, match="unknown options"):
        Extractor(server.target, **OPTIONS, regions=[[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="pool"):
        Extractor(server.target, model="m", nodes="features.6", pool="median")
    with pytest.raises(ValueError, match="errors"):
        Extractor(server.target, **OPTIONS, errors="ignore")
    blob = np.empty(1, dtype=object)
    blob[:] = jpegs[:1]
    with Extractor(server.target, model="m", nodes={"features.6": "id"}) as e:
        with pytest.raises(ValueError, match="replace input columns"):
            e({"image": blob, "id": np.array([1])})
        with pytest.raises(KeyError, match="none of the image columns"):
            e({"pixels": blob})


def test_fleet_target() -> None:
    assert fleet_target("10.0.0.1:50051") == "10.0.0.1:50051"
    assert fleet_target("dns:///svc.ns:50051") == "dns:///svc.ns:50051"
    assert fleet_target(["10.0.0.1:1", "10.0.0.2:2"]) == "10.0.0.1:1,10.0.0.2:2"
    assert fleet_target("10.0.0.1:1, 10.0.0.1:1,10.0.0.2:2") == "10.0.0.1:1,10.0.0.2:2"
    assert fleet_target(["localhost:5", "127.0.0.2:6"]) == "127.0.0.1:5,127.0.0.2:6"
    assert fleet_target(["[::1]:5"]) == "[::1]:5"
    with pytest.raises(ValueError, match="host:port"):
        fleet_target(["10.0.0.1:1", "10.0.0.2"])
    with pytest.raises(ValueError):
        fleet_target(["10.0.0.1:1", ""])
    with pytest.raises(TypeError):
        fleet_target(b"10.0.0.1:1")


def test_local_extractor_from_a_toml_file(
    tmp_path: Path, jpegs: list[bytes], reference: dict[int, dict[str, np.ndarray]]
) -> None:
    config = tmp_path / "models.toml"
    config.write_text(
        '[server]\nmax_batch_size = 2\n\n[[models]]\nname = "m"\narch = "mobilenet_v2"\n'
        'weights = "IMAGENET1K_V1"\n\n[[models]]\nname = "other"\narch = "resnet18"\n'
        'weights = "none"\nallow_random = true\n'
    )
    with pytest.raises(ValueError, match="name one with model="):
        LocalExtractor(config=config, nodes="features.6")
    with pytest.raises(ValueError, match="sets \\['port'\\] itself"):
        LocalExtractor("m", config=config, nodes="features.6", settings={"port": 5})
    local = LocalExtractor(
        "m",
        config=config,
        settings={"compile_budget_s": 0},
        **{k: v for k, v in OPTIONS.items() if k != "model"},
    )
    try:
        assert local.local.server.settings.max_batch_size == 2  # the file's [server] table
        assert [m.name for m in local.local.server.settings.models] == ["m"]
        with FeatureClient(f"127.0.0.1:{local.local.port}") as stranger:
            with pytest.raises(FeatureServiceError, match="UNAUTHENTICATED"):
                stranger.list_models()  # private: only the actor knows the token
        blob = np.empty(3, dtype=object)
        blob[:] = jpegs[3:6]
        out = local({"image": blob})
        for key in NODES:
            assert_same(out[key], np.stack([reference[i][key] for i in (3, 4, 5)]), key)
    finally:
        local.close()
    assert not local.local.thread.is_alive()
