"""Copy detection on real photos: layertap descriptors side by side with a perceptual hash.

    python examples/copy_detection/run.py [--quick] [--target HOST:PORT] [--json results.json]

References are the real photos that ship with scikit-image, scikit-learn and matplotlib;
queries are edited copies of them (crop, JPEG, flip, rotate, gray, blur, text overlay, resize,
paste onto a canvas, and combinations) plus negative queries: other photos, as is and edited,
that have no reference. The reference index also holds distractors (tiles of yet other
photos, and synthetic images). The PCA-whitening heads are fitted on tiles of a fourth,
disjoint group of photos (never a reference, query or distractor).

Metrics (DISC21 / ISC style): recall@1 over the queries that have a reference, and micro-AP:
every (query, reference) pair ranked by similarity, one precision-recall curve for all
queries, so a confident false match on a negative query costs as much as a missed copy.

Without --target the script starts its own in-process server (mobilenet_v2 with its ImageNet
weights, needs the server extra and `make weights`) twice: once to describe the whitening
sample, then with the fitted heads registered (``[[heads]]``), so whitening runs server-side
with ``post=["l2", "whiten:HEAD"]``. With --target the whitening is applied client-side with
the same numpy formula (the remote server does not have these heads).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from layertap.client import FeatureClient
from layertap.client import _whitening as whitening

MODEL = "mobilenet_v2"
NODE = "features"  # the last feature map, 1280 channels, stride 32
POOLS = ("avg", "gem", "rmac")

# ----------------------------------------------------------------------------- photos


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        if name == "motorcycle":
            return np.asarray(skimage.data.stereo_motorcycle()[0])  # left view only
        return np.asarray(getattr(skimage.data, name)())

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(name))

    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib.cbook

        path = matplotlib.cbook.get_sample_data(name, asfileobj=False)
        with Image.open(str(path)) as im:
            return np.asarray(im.convert("RGB"))

    return load


# Every photo these packages ship that loads offline (gray ones become 3-channel RGB).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    **{
        n: _skimage(n)
        for n in (
            "astronaut",
            "chelsea",
            "coffee",
            "rocket",
            "hubble_deep_field",
            "immunohistochemistry",
            "retina",
            "motorcycle",
            "camera",
            "moon",
            "coins",
            "clock",
            "page",
            "text",
            "cell",
            "brick",
            "grass",
            "gravel",
        )
    },
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
}
# Synthetic images (not photos): only ever distractors in the reference index.
GRAPHICS: dict[str, Callable[[], np.ndarray]] = {
    n: _skimage(n) for n in ("colorwheel", "logo", "horse", "checkerboard")
}


@dataclass(frozen=True)
class Split:
    """Disjoint groups of photos: each photo plays exactly one role."""

    references: tuple[str, ...]
    negatives: tuple[str, ...]  # queried (as is and edited), never indexed
    distractors: tuple[str, ...]  # tiles in the reference index
    whitening: tuple[str, ...]  # tiles the heads are fitted on
    edits: tuple[str, ...]
    negative_edits: tuple[str, ...]
    graphics: tuple[str, ...] = ()
    tile_grids: tuple[int, ...] = (2, 3)
    whitening_grids: tuple[int, ...] = (2, 3, 4)


FULL = Split(
    references=(
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "china",
        "flower",
        "grace_hopper",
        "motorcycle",
        "camera",
        "coins",
    ),
    negatives=("hubble_deep_field", "moon", "clock", "brick"),
    distractors=("cell", "gravel", "text", "immunohistochemistry"),
    whitening=("retina", "grass", "page"),
    edits=(
        "crop",
        "crop_corner",
        "jpeg",
        "flip",
        "rotate",
        "gray",
        "blur",
        "text",
        "resize",
        "canvas",
        "crop+jpeg+gray",
        "flip+text+blur",
        "canvas+rotate",
    ),
    negative_edits=("none", "crop", "jpeg", "text", "canvas"),
    graphics=tuple(GRAPHICS),
)
QUICK = Split(
    references=("astronaut", "chelsea", "coffee", "china"),
    negatives=("rocket",),
    distractors=("camera",),
    whitening=("grace_hopper", "flower"),
    edits=("crop", "jpeg", "flip", "text", "canvas"),
    negative_edits=("none",),
    tile_grids=(2,),
    whitening_grids=(2, 3),
)

# ----------------------------------------------------------------------------- edits


def _rng(*keys: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(keys).encode()))


def crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop keeping 50-70 % of each side."""
    w, h = im.size
    f = rng.uniform(0.5, 0.7)
    cw, ch = int(w * f), int(h * f)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x, y, x + cw, y + ch))


def crop_corner(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One corner, 55 % of each side: a copy that keeps less than a third of the picture."""
    w, h = im.size
    cw, ch = int(w * 0.55), int(h * 0.55)
    x, y = (w - cw) * int(rng.integers(0, 2)), (h - ch) * int(rng.integers(0, 2))
    return im.crop((x, y, x + cw, y + ch))


def jpeg(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(8, 16)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def flip(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def rotate(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = float(rng.uniform(10, 25)) * (1 if rng.integers(0, 2) else -1)
    return im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)


def gray(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return im.convert("L").convert("RGB")


def blur(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(radius=max(im.size) / 120))


def text(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Three lines of large caption text (meme-style: white with a black outline)."""
    out = im.convert("RGB")
    draw = ImageDraw.Draw(out)
    w, h = out.size
    size = max(12, h // 8)
    font = ImageFont.load_default(size=size)
    words = ("COPY", "SHARE THIS", "layertap", "NO WAY", "2026", "LOL")
    for i in range(3):
        line = " ".join(words[int(j)] for j in rng.integers(0, len(words), 2))
        y = int(h * (0.08 + 0.32 * i))
        x = int(rng.integers(0, max(1, w // 5)))
        draw.text(
            (x, y), line, font=font, fill="white", stroke_width=size // 10, stroke_fill="black"
        )
    return out


def resize(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Down to a fifth of each side: most detail is gone."""
    w, h = im.size
    return im.resize((max(16, w // 5), max(16, h // 5)), Image.Resampling.BILINEAR)


def canvas(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The photo shrunk to ~half and pasted at a random spot on a noisy coloured canvas."""
    w, h = im.size
    f = rng.uniform(0.4, 0.6)
    small = im.convert("RGB").resize((int(w * f), int(h * f)), Image.Resampling.BILINEAR)
    colour = rng.integers(0, 256, 3)
    noise = rng.normal(0, 25, (h, w, 3))
    back = Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8))
    back.paste(
        small, (int(rng.integers(0, w - small.width)), int(rng.integers(0, h - small.height)))
    )
    return back


EDITS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "none": lambda im, rng: im,
    "crop": crop,
    "crop_corner": crop_corner,
    "jpeg": jpeg,
    "flip": flip,
    "rotate": rotate,
    "gray": gray,
    "blur": blur,
    "text": text,
    "resize": resize,
    "canvas": canvas,
}


def apply_edit(name: str, im: Image.Image, photo: str) -> Image.Image:
    """An edit or a '+' combination, applied left to right, seeded by photo and edit."""
    for i, step in enumerate(name.split("+")):
        im = EDITS[step](im, _rng(photo, name, str(i)))
    return im.convert("RGB")


def tiles(im: Image.Image, grids: Sequence[int]) -> Iterator[tuple[str, Image.Image]]:
    """Non-overlapping g x g tiles of the photo, for each g."""
    w, h = im.size
    for g in grids:
        for r in range(g):
            for c in range(g):
                box = (c * w // g, r * h // g, (c + 1) * w // g, (r + 1) * h // g)
                yield f"{g}x{g}_{r}{c}", im.crop(box)


# ----------------------------------------------------------------------------- data set


@dataclass
class Dataset:
    references: list[tuple[str, Image.Image]] = field(default_factory=list)  # the index
    queries: list[tuple[str, Image.Image, str | None, str]] = field(default_factory=list)
    training: list[tuple[str, Image.Image]] = field(default_factory=list)  # whitening sample

    def counts(self, split: Split) -> dict[str, int]:
        positives = sum(1 for q in self.queries if q[2] is not None)
        return {
            "references": len(split.references),
            "distractors": len(self.references) - len(split.references),
            "positive_queries": positives,
            "negative_queries": len(self.queries) - positives,
            "whitening_images": len(self.training),
        }


def build(split: Split) -> Dataset:
    def load(loader: Callable[[], np.ndarray]) -> Image.Image:
        arr = loader()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        return Image.fromarray(arr).convert("RGB")

    data = Dataset()
    for name in split.references:
        im = load(PHOTOS[name])
        data.references.append((name, im))
        for edit in split.edits:
            data.queries.append((f"{name}/{edit}", apply_edit(edit, im, name), name, edit))
    for name in split.distractors:
        im = load(PHOTOS[name])
        data.references.extend((f"{name}/{t}", tile) for t, tile in tiles(im, split.tile_grids))
    for name in split.graphics:
        data.references.append((name, load(GRAPHICS[name])))
    for name in split.negatives:
        im = load(PHOTOS[name])
        for edit in split.negative_edits:
            data.queries.append((f"{name}/{edit}", apply_edit(edit, im, name), None, edit))
    for name in split.whitening:
        im = load(PHOTOS[name])
        for t, tile in tiles(im, split.whitening_grids):
            data.training.append((f"{name}/{t}", tile))
    return data


# ----------------------------------------------------------------------------- metrics


def micro_ap(scores: np.ndarray, truth: np.ndarray) -> float:
    """Average precision of all (query, reference) pairs ranked by score, the recall over
    every true pair (DISC21's micro-AP). Tied scores form one step (as scikit-learn's
    average_precision_score), so ties are neither rewarded nor punished by their order."""
    s, t = scores.ravel(), truth.ravel()
    total = int(t.sum())
    if total == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each tie group
    tp = np.cumsum(t)[ends]
    precision = tp / (ends + 1)
    recall = tp / total
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def recall_at_1(scores: np.ndarray, truth: np.ndarray) -> float:
    """Share of the queries that have a reference whose best match is it; when several
    references tie for best, the query counts 1/(number tied) (random tie breaking)."""
    rows = truth.any(axis=1)
    s, t = scores[rows], truth[rows]
    best = s.max(axis=1, keepdims=True)
    tied = s == best
    return float(np.mean((tied & t).sum(axis=1) / tied.sum(axis=1)))


def per_edit_recall(scores: np.ndarray, truth: np.ndarray, edits: list[str]) -> dict[str, float]:
    out = {}
    for edit in dict.fromkeys(edits):
        rows = np.array([e == edit for e in edits]) & truth.any(axis=1)
        if rows.any():
            out[edit] = recall_at_1(scores[rows], truth[rows])
    return out


# ----------------------------------------------------------------------------- server


@contextmanager
def local_server(heads: Sequence[tuple[str, Path]] = ()) -> Iterator[str]:
    """An in-process layertap server (mobilenet_v2, ImageNet weights) on a free port."""
    from layertap.server.app import create_server
    from layertap.server.settings import HeadConfig, ModelConfig, Settings

    settings = Settings(
        host="127.0.0.1",
        port=0,
        metrics=False,
        max_batch_size=8,
        max_wait_ms=5,
        models=(ModelConfig(name=MODEL, arch=MODEL, weights="IMAGENET1K_V1"),),
        heads=tuple(HeadConfig(name=n, file=str(p), model=MODEL) for n, p in heads),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="layertap-server", daemon=True)
    thread.start()

    async def boot() -> tuple[Any, int]:
        server, port = await create_server(settings)
        await server.start()
        await server.wait_ready(600)
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(boot(), loop).result(600)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def prepare(im: Image.Image, size: int) -> np.ndarray:
    """The whole image (nothing cropped away: a centre crop would cut the borders a copy
    detector needs), longer side ``size``, shorter side rounded to a multiple of 32, as uint8
    RGB. The rounding (at most 16 px of aspect change) makes images share a few shapes, so they
    batch together and the CPU kernels of each shape are built once; at stride 32 the
    feature map covers the image exactly."""
    w, h = im.size
    f = size / max(w, h)
    short = max(64, 32 * round(min(w, h) * f / 32))
    shape = (size, short) if w >= h else (short, size)
    return np.asarray(im.resize(shape, Image.Resampling.BICUBIC))


def describe(
    client: FeatureClient,
    images: Sequence[np.ndarray],
    pool: str,
    post: Sequence[str] = (),
    chunk: int = 16,
) -> np.ndarray:
    """L2-normalised descriptors [N, D] of ``images`` (each at its own resolution)."""
    extra: dict[str, Any] = {"post": list(post)} if post else {}
    rows = []
    for i in range(0, len(images), chunk):
        out = client.extract(
            list(images[i : i + chunk]),
            model=MODEL,
            nodes={NODE: "d"},
            pool=pool,
            normalize=True,
            native_resolution=True,
            **extra,
        )
        rows.append(np.asarray(out["d"], dtype=np.float32))
    return np.concatenate(rows)


def phash_scores(queries: Sequence[Image.Image], refs: Sequence[Image.Image]) -> np.ndarray:
    """Similarity = 64 - Hamming distance of 64-bit perceptual hashes (imagehash.phash)."""
    import imagehash

    def bits(im: Image.Image) -> np.ndarray:
        return np.asarray(imagehash.phash(im).hash, dtype=bool).ravel()

    q = np.stack([bits(im) for im in queries])
    r = np.stack([bits(im) for im in refs])
    hamming = (q[:, None, :] != r[None, :, :]).sum(-1)
    return (q.shape[1] - hamming).astype(np.float32)


# ----------------------------------------------------------------------------- the run


@dataclass
class Row:
    method: str
    dim: int
    recall1: float
    micro_ap: float
    per_edit: dict[str, float]
    note: str = ""


def evaluate(
    method: str, scores: np.ndarray, truth: np.ndarray, edits: list[str], dim: int, note: str = ""
) -> Row:
    return Row(
        method,
        dim,
        recall_at_1(scores, truth),
        micro_ap(scores, truth),
        per_edit_recall(scores, truth, edits),
        note,
    )


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| descriptor | dim | recall@1 | µAP |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        name = f"{r.method} ({r.note})" if r.note else r.method
        lines.append(f"| {name} | {r.dim} | {r.recall1:.3f} | {r.micro_ap:.3f} |")
    return "\n".join(lines)


def markdown_per_edit(rows: Sequence[Row]) -> str:
    edits = list(rows[0].per_edit)
    lines = [
        "| edit | " + " | ".join(r.method for r in rows) + " |",
        "| --- |" + " ---: |" * len(rows),
    ]
    for e in edits:
        lines.append(f"| {e} | " + " | ".join(f"{r.per_edit.get(e, 0):.2f}" for r in rows) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 references, 5 edits (for tests)")
    parser.add_argument(
        "--target", help="use this running server (with mobilenet_v2) instead of starting one"
    )
    parser.add_argument(
        "--size", type=int, default=288, help="longer side sent to the model (default: 288)"
    )
    parser.add_argument(
        "--shrinkage",
        type=float,
        default=0.5,
        help="whitening eigenvalue shrinkage (see layertap fit-whitening; default: 0.5)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    split = QUICK if args.quick else FULL
    data = build(split)
    counts = data.counts(split)
    ref_ids = [r[0] for r in data.references]
    truth = np.array([[q[2] == rid for rid in ref_ids] for q in data.queries])
    edits = [q[3] for q in data.queries]
    ref_px = [prepare(im, args.size) for _, im in data.references]
    query_px = [prepare(im, args.size) for _, im, _, _ in data.queries]
    train_px = [prepare(im, args.size) for _, im in data.training]

    rows = [
        evaluate(
            "phash",
            phash_scores([q[1] for q in data.queries], [r[1] for r in data.references]),
            truth,
            edits,
            64,
            "Hamming",
        )
    ]
    heads: dict[str, whitening.Whitening] = {}
    consistency: list[float] = []

    def fit_heads(client: FeatureClient) -> None:
        for pool in POOLS:
            x = describe(client, train_px, pool)
            heads[pool] = whitening.fit(
                x, shrinkage=args.shrinkage, model=MODEL, nodes=[NODE], pool=pool
            )

    def describe_all(client: FeatureClient, server_heads: bool) -> None:
        for pool in POOLS:
            refs, queries = describe(client, ref_px, pool), describe(client, query_px, pool)
            rows.append(evaluate(pool, queries @ refs.T, truth, edits, refs.shape[1]))
            head = heads[pool]
            if server_heads:
                post = ["l2", f"whiten:{pool}"]
                w_refs = describe(client, ref_px, pool, post)
                w_queries = describe(client, query_px, pool, post)
                # the server's whitening is the numpy formula: check it on these descriptors
                for served, mine in ((w_refs, refs), (w_queries, queries)):
                    consistency.append(float(np.abs(served - head.transform(mine)).max()))
            else:
                w_refs, w_queries = head.transform(refs), head.transform(queries)
            rows.append(
                evaluate(
                    f"{pool} + whiten",
                    w_queries @ w_refs.T,
                    truth,
                    edits,
                    head.n_components,
                )
            )

    if args.target:
        where = f"server {args.target}; whitening applied client-side (numpy)"
        with FeatureClient(args.target) as client:
            fit_heads(client)
            describe_all(client, server_heads=False)
    else:
        where = "in-process server; whitening server-side (post=['l2', 'whiten:HEAD'])"
        with tempfile.TemporaryDirectory(prefix="layertap-cd-") as tmp:
            with local_server() as target, FeatureClient(target) as client:
                fit_heads(client)
            files = []
            for pool, head in heads.items():
                path = Path(tmp) / f"{pool}.npz"
                whitening.save(head, path)
                files.append((pool, path))
            with local_server(files) as target, FeatureClient(target) as client:
                describe_all(client, server_heads=True)
    # reorder: phash, then each pool plain and whitened
    order = ["phash"] + [m for p in POOLS for m in (p, f"{p} + whiten")]
    rows.sort(key=lambda r: order.index(r.method))
    elapsed = time.perf_counter() - start

    print(
        f"copy detection, {'quick' if args.quick else 'full'} set: {counts['references']} "
        f"references + {counts['distractors']} distractors indexed; "
        f"{counts['positive_queries']} edited copies + {counts['negative_queries']} negative "
        f"queries; whitening fitted on {counts['whitening_images']} tiles of other photos "
        f"(shrinkage {args.shrinkage:g})"
    )
    print(f"{MODEL} {NODE}, longer side {args.size} px, {where}")
    if consistency:
        print(f"server-side vs numpy whitening: max |difference| {max(consistency):.2e}")
    print()
    print(markdown(rows))
    print()
    print("recall@1 per edit:")
    print()
    print(markdown_per_edit(rows))
    print(f"\n{elapsed:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "counts": counts,
                    "size": args.size,
                    "shrinkage": args.shrinkage,
                    "where": where,
                    "whitening_consistency": max(consistency) if consistency else None,
                    "rows": [r.__dict__ for r in rows],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
