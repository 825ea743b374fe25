"""`layertap extract DIR`: discovery, the three output formats, failures and resuming.

The main checks run real photos through a real in-process server (mobilenet_v2 with its
ImageNet weights); a small stand-in client covers storage edge cases without a forward.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import RunningServer, photo
from PIL import Image

from layertap.client import FeatureClient, FeatureServiceError
from layertap.client.cli import extract_dir as bulk
from layertap.client.cli import main
from layertap.client.cli.stores import atomic_write

NODES = ["features.14", "features.18"]


def _variants() -> Iterator[tuple[str, Image.Image]]:
    """20 distinct real images: four photos, each plain, flipped, cropped, grey, rotated."""
    for name in ("astronaut", "chelsea", "coffee", "china"):
        img = Image.fromarray(photo(name))
        img.thumbnail((256, 256))
        w, h = img.size
        yield f"{name}.jpg", img
        yield f"flipped/{name}.png", img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        yield f"crops/{name}_crop.webp", img.crop((w // 8, h // 8, w - w // 8, h - h // 8))
        yield f"crops/deeper/{name}_grey.JPG", img.convert("L").convert("RGB")
        yield f"{name}_rot.bmp", img.rotate(90, expand=True)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real images, plus things that are not images or cannot be read."""
    root = tmp_path_factory.mktemp("photos")
    for rel, img in _variants():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    (root / "crops" / "broken.jpg").write_bytes(b"this is not a JPEG at all")
    (root / "notes.txt").write_text("not an image")
    img.save(root / ".hidden.jpg")  # hidden files are skipped (macOS ._x.jpg, caches)
    (root / "dangling.jpg").symlink_to(root / "missing.jpg")
    (root / "loop").symlink_to(root)  # a link cycle must not loop forever
    return root


GOOD_IDS = sorted(rel for rel, _ in _variants())


def _cli(server: RunningServer, *args: str) -> list[str]:
    return ["--target", server.target, "extract", *args]


def _load(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """ids and arrays of an output, whatever its format."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return [str(i) for i in npz["ids"]], {k: npz[k] for k in npz.files if k != "ids"}
    if path.suffix == ".npy":
        ids = path.with_suffix(".ids.txt").read_text().splitlines()
        return ids, {"": np.load(path, allow_pickle=False)}
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.column("id").to_pylist(), {
        k: np.array(table.column(k).to_pylist(), dtype=np.float32)
        for k in table.column_names
        if k != "id"
    }


def _assert_same(a: Path, b: Path) -> None:
    ids_a, arrays_a = _load(a)
    ids_b, arrays_b = _load(b)
    assert ids_a == ids_b
    assert list(arrays_a) == list(arrays_b)
    for key in arrays_a:
        np.testing.assert_allclose(arrays_a[key], arrays_b[key], atol=1e-5, rtol=0)


def _args_for(fmt: str) -> list[str]:
    if fmt == ".npy":
        return ["-n", "features.18", "--pool", "gem"]
    return ["--node", NODES[0], "-n", NODES[1], "--pool", "avg"]


# --------------------------------------------------------------------------- real server


@pytest.mark.parametrize("fmt", [".npz", ".npy", ".parquet"])
def test_extract_dir_resumes_to_the_same_file(
    small_server: RunningServer,
    photo_dir: Path,
    tmp_path: Path,
    fmt: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opts = ["--model", "mobilenet_v2", *_args_for(fmt), "--recursive", "--no-progress"]
    full = tmp_path / f"full{fmt}"
    assert main(_cli(small_server, str(photo_dir), *opts, "-o", str(full))) == 1  # broken.jpg
    out, err = capsys.readouterr()
    assert "broken.jpg" in err and "INVALID_ARGUMENT" in err  # reported while running
    assert "1 failed" in out and "broken.jpg" in out  # and in the summary
    assert "dangling.jpg" in err  # the broken link was reported as skipped
    ids, arrays = _load(full)
    assert ids == GOOD_IDS  # relative to the folder, sorted; no bad, hidden or looped file
    for array in arrays.values():
        assert array.shape[0] == len(GOOD_IDS) and np.isfinite(array).all()
    # distinct photos give distinct vectors; the same photo under two names would not
    first = next(iter(arrays.values()))
    assert len({row.tobytes() for row in first}) == len(GOOD_IDS)

    # Interrupted after 7 images (Ctrl-C): what was computed is kept.
    resumed = tmp_path / f"resumed{fmt}"
    original = FeatureClient.extract_many

    def interrupted(self: FeatureClient, items: Any, **kwargs: Any) -> Iterator[Any]:
        for i, pair in enumerate(original(self, items, **kwargs)):
            if i == 7:
                raise KeyboardInterrupt
            yield pair

    monkeypatch.setattr(FeatureClient, "extract_many", interrupted)
    argv = _cli(small_server, str(photo_dir), *opts, "-o", str(resumed), "--checkpoint-every", "3")
    assert main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err.lower()
    partial_ids, _ = _load(resumed)
    assert 0 < len(partial_ids) <= 7 and set(partial_ids) < set(GOOD_IDS)

    # The rerun extracts only the rest, and ends with the uninterrupted run's file.
    monkeypatch.setattr(FeatureClient, "extract_many", original)
    assert main(argv) == 1  # broken.jpg is retried, and fails again
    out = capsys.readouterr().out
    assert f"{len(partial_ids)} already in" in out
    _assert_same(resumed, full)

    # A third run has nothing left to do but the failing file.
    assert main(argv) == 1
    assert f"0 new image(s) extracted, {len(GOOD_IDS)} already in" in capsys.readouterr().out
    _assert_same(resumed, full)


def test_extract_dir_survives_a_kill_after_a_checkpoint(
    small_server: RunningServer, photo_dir: Path, tmp_path: Path
) -> None:
    """A process killed outright (no cleanup at all) keeps its last checkpoint."""
    out = tmp_path / "feats.npz"
    argv = _cli(
        small_server, str(photo_dir), "-r", "--model", "mobilenet_v2", "-n", "features.18",
        "--pool", "gem", "-o", str(out), "--checkpoint-every", "4", "--no-progress",
    )  # fmt: skip
    script = textwrap.dedent(
        f"""
        import os
        from layertap.client import FeatureClient
        from layertap.client.cli import main
        original = FeatureClient.extract_many
        def killed(self, items, **kwargs):
            for i, pair in enumerate(original(self, items, **kwargs)):
                if i == 10:
                    os._exit(9)  # like SIGKILL: no except, no finally, no atexit
                yield pair
        FeatureClient.extract_many = killed
        main({argv!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == 9, proc.stderr.decode()
    ids, _ = _load(out)
    assert len(ids) == 8  # two checkpoints of 4; items 9-10 were lost with the process
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    assert main(argv) == 1  # broken.jpg
    full = tmp_path / "full.npz"
    assert main([*argv[: argv.index("-o") + 1], str(full), "--no-progress"]) == 1
    _assert_same(out, full)


def test_extract_dir_refuses_bad_output_combinations(
    small_server: RunningServer, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _cli(small_server, str(photo_dir), "--model", "mobilenet_v2", "--no-progress")
    npy = str(tmp_path / "f.npy")
    assert main([*base, "-n", "features.14", "-n", "features.18", "--pool", "gem", "-o", npy]) == 2
    assert "exactly one --node" in capsys.readouterr().err
    assert main([*base, "-n", "features.18", "-o", npy]) == 2  # raw maps
    assert "pooled" in capsys.readouterr().err
    assert not (tmp_path / "f.npy").exists()
    assert main([*base, "-n", "features.18"]) == 2  # a directory needs an output
    assert "-o" in capsys.readouterr().err

    # A typo in the node fails once, before any image is sent, with the server's hint.
    npz = str(tmp_path / "f.npz")
    assert main([*base, "-n", "features.99", "--pool", "gem", "-o", npz]) == 1
    err = capsys.readouterr().err
    assert err.count("features.99") == 1 and "INVALID_ARGUMENT" in err
    assert not (tmp_path / "f.npz").exists()

    # Resuming into a file made with other nodes would mix features: refused.
    assert main([*base, "-n", "features.14", "--pool", "gem", "-o", npz]) == 0  # top level only
    assert len(_load(Path(npz))[0]) == len([i for i in GOOD_IDS if "/" not in i])
    assert main([*base, "-n", "features.18", "--pool", "gem", "-o", npz]) == 2
    assert "features.14" in capsys.readouterr().err


def test_single_files_keep_the_one_request_mode(
    small_server: RunningServer, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Plain files and an .npz: one request, a summary table, arrays without ids (as before)."""
    files = [str(photo_dir / "chelsea.jpg"), str(photo_dir / "coffee.jpg")]
    out = tmp_path / "two.npz"
    argv = _cli(small_server, *files, "--model", "mobilenet_v2", "-n", "features.18",
                "--pool", "gem", "-o", str(out))  # fmt: skip
    assert main(argv) == 0
    assert "KEY" in capsys.readouterr().out
    with np.load(out) as npz:
        assert list(npz.keys()) == ["features.18"] and npz["features.18"].shape == (2, 1280)
    # The same files into a .parquet take the bulk mode; ids are the paths as given.
    table = tmp_path / "two.parquet"
    assert main([*argv[:-1], str(table), "--no-progress"]) == 0
    ids, arrays = _load(table)
    assert ids == sorted(Path(f).as_posix() for f in files)
    with np.load(out) as npz:  # same model, same images: the same vectors as the npz
        np.testing.assert_allclose(arrays["features.18"], npz["features.18"], atol=1e-5)


# --------------------------------------------------------------------------- stand-in client


class StandIn:
    """Computes a vector from each image's bytes (sha256), no model: for storage checks."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def extract(self, images: Any, *, nodes: list[str], **kwargs: Any) -> dict[str, np.ndarray]:
        return {n: np.zeros((1, 8), kwargs.get("dtype", "float32")) for n in nodes}

    def extract_many(self, items: Any, *, nodes: list[str], **kwargs: Any) -> Iterator[Any]:
        assert kwargs["errors"] == "yield"
        for image_id, data in items:
            self.sent.append(image_id)
            if data.startswith(b"bad"):
                yield image_id, FeatureServiceError(grpc.StatusCode.INVALID_ARGUMENT, "image 0")
                continue
            dtype = kwargs.get("dtype", "float32")
            yield image_id, {n: self.vector(data, n)[None].astype(dtype) for n in nodes}

    @staticmethod
    def vector(data: bytes, node: str) -> np.ndarray:
        digest = hashlib.sha256(data + node.encode()).digest()
        return np.frombuffer(digest[:8], np.uint8).astype(np.float32)


def _opts(inputs: list[Path], output: Path, **kwargs: Any) -> bulk.Options:
    return bulk.Options(inputs=inputs, output=output, model="m", nodes=["a", "b"],
                        pool="gem", progress=False, **kwargs)  # fmt: skip


def test_discovery_ids_order_and_skips(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    for rel in ["b.PNG", "a.jpg", "sub/c.webp", "sub/deep/d.jpeg", "sub/x.dat", ".h.jpg"]:
        (tmp_path / rel).write_bytes(b"img " + rel.encode())
    images, skipped = bulk.discover([tmp_path], recursive=False)
    assert [i.id for i in images] == ["a.jpg", "b.PNG"]
    images, _ = bulk.discover([tmp_path], recursive=True)
    assert [i.id for i in images] == ["a.jpg", "b.PNG", "sub/c.webp", "sub/deep/d.jpeg"]
    assert skipped == []
    # a file argument keeps its path as id and is taken whatever its extension (but .txt and
    # .parquet, which are lists: tests/test_cli_inputs.py); inputs come in the order given
    images, _ = bulk.discover([tmp_path / "sub" / "x.dat", tmp_path / "sub"], recursive=False)
    assert [i.id for i in images] == [(tmp_path / "sub" / "x.dat").as_posix(), "c.webp"]
    # two directories holding the same relative name would overwrite each other: refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"different")
    with pytest.raises(ValueError, match=r"both be stored as id 'a\.jpg'"):
        bulk.discover([tmp_path, other], recursive=False)
    with pytest.raises(FileNotFoundError, match="nope"):
        bulk.discover([tmp_path / "nope"], recursive=False)


@pytest.mark.parametrize("fmt", [".npz", ".parquet"])
def test_unreadable_and_failed_images_are_retried(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.jpg").write_bytes(f"image {i}".encode())
    (src / "bad.jpg").write_bytes(b"bad bytes")
    (src / "empty.jpg").write_bytes(b"")
    locked = src / "3.jpg"
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    out = tmp_path / f"o{fmt}"
    client = StandIn()
    assert bulk.run(client, _opts([src], out)) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert f"{locked}: unreadable: Permission denied" in err
    assert "bad.jpg: INVALID_ARGUMENT: image 0" in err and "empty.jpg: empty file" in err
    assert "3.jpg" not in client.sent  # never sent
    ids, arrays = _load(out)
    assert ids == ["0.jpg", "1.jpg", "2.jpg", "4.jpg", "5.jpg"]
    expected = np.stack([StandIn.vector(f"image {i}".encode(), "b") for i in (0, 1, 2, 4, 5)])
    np.testing.assert_array_equal(arrays["b"], expected)

    # Fixed permissions: the next run sends only the images not yet stored.
    monkeypatch.setattr(Path, "read_bytes", real_read)
    client = StandIn()
    assert bulk.run(client, _opts([src], out)) == 1  # bad.jpg, empty.jpg still fail
    assert sorted(client.sent) == ["3.jpg", "bad.jpg"]
    ids, arrays = _load(out)
    assert ids == [f"{i}.jpg" for i in range(6)]  # sorted, 3.jpg in its place
    np.testing.assert_array_equal(arrays["a"][3], StandIn.vector(b"image 3", "a"))


def test_a_server_going_away_stops_the_run_and_keeps_the_work(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.jpg").write_bytes(f"image {i}".encode())

    class Dying(StandIn):
        def extract_many(self, items: Any, **kwargs: Any) -> Iterator[Any]:
            for i, pair in enumerate(super().extract_many(items, **kwargs)):
                if i == 2:  # every later item would fail the same way
                    yield pair[0], FeatureServiceError(grpc.StatusCode.UNAVAILABLE, "gone")
                    raise AssertionError("the run should have stopped")
                yield pair

    out = tmp_path / "o.npz"
    with pytest.raises(FeatureServiceError, match="gone"):
        bulk.run(Dying(), _opts([src], out))  # type: ignore[arg-type]
    assert _load(out)[0] == ["0.jpg", "1.jpg"]
    assert bulk.run(StandIn(), _opts([src], out)) == 0  # type: ignore[arg-type]
    assert _load(out)[0] == [f"{i}.jpg" for i in range(5)]


def test_foreign_or_mismatched_files_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "0.jpg").write_bytes(b"image")
    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.zeros((1, 8)))
    with pytest.raises(ValueError, match="no 'ids' array"):
        bulk.run(StandIn(), _opts([src], plain))  # type: ignore[arg-type]
    table = tmp_path / "t.parquet"
    assert bulk.run(StandIn(), _opts([src], table)) == 0  # type: ignore[arg-type]
    other = _opts([src], table)
    other.pool = "max"
    with pytest.raises(ValueError, match="different options"):
        bulk.run(StandIn(), other)  # type: ignore[arg-type]
    npy = tmp_path / "v.npy"
    single = _opts([src], npy)
    single.nodes = ["a"]
    assert bulk.run(StandIn(), single) == 0  # type: ignore[arg-type]
    npy.with_suffix(".ids.txt").write_text("0.jpg\nextra.jpg\n")
    with pytest.raises(ValueError, match="2 ids but"):
        bulk.run(StandIn(), single)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown output format"):
        bulk.run(StandIn(), _opts([src], tmp_path / "x.csv"))  # type: ignore[arg-type]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # temp files cleaned


def test_progress_bar_counts_every_image_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.jpg").write_bytes(f"image {i}".encode())
    (src / "empty.jpg").write_bytes(b"")  # fails before sending: still counted
    opts = _opts([src], tmp_path / "o.npz")
    opts.progress = True  # the command's default
    assert bulk.run(StandIn(), opts) == 1  # type: ignore[arg-type]
    assert "6/6" not in capsys.readouterr().err  # not a terminal: no bar
    (tmp_path / "o.npz").unlink()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert bulk.run(StandIn(), opts) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "6/6" in err and "empty.jpg: empty file" in err
    opts.progress = False  # --no-progress
    (tmp_path / "o.npz").unlink()
    assert bulk.run(StandIn(), opts) == 1  # type: ignore[arg-type]
    assert "6/6" not in capsys.readouterr().err


@pytest.mark.parametrize("fmt", [".npz", ".npy", ".parquet"])
def test_float16_outputs_resume_in_every_format(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(f"image {i}".encode())
    out = tmp_path / f"o{fmt}"
    opts = _opts([src], out, dtype="float16")
    opts.nodes = ["a"]
    first = src / "3.jpg"
    first.rename(tmp_path / "later.jpg")  # the first run sees three images
    assert bulk.run(StandIn(), opts) == 0  # type: ignore[arg-type]
    (tmp_path / "later.jpg").rename(first)
    client = StandIn()
    assert bulk.run(client, opts) == 0  # type: ignore[arg-type]
    assert client.sent == ["3.jpg"]
    ids, arrays = _load(out)
    assert ids == [f"{i}.jpg" for i in range(4)]
    (array,) = arrays.values()
    expected = np.stack([StandIn.vector(f"image {i}".encode(), "a") for i in range(4)])
    np.testing.assert_array_equal(array, expected.astype(np.float16))


def test_outputs_go_into_missing_directories(tmp_path: Path) -> None:
    """`-o new/dir/x.npz` (and fit-whitening's head) creates the directories, atomically."""
    target = tmp_path / "new" / "dir" / "x.bin"
    atomic_write(target, lambda f: f.write(b"abc"))
    assert target.read_bytes() == b"abc"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]  # no temp file left
