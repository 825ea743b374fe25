"""Write a small demo collection of real photos, to try the indexing scripts without your own.

    python examples/indexing/sample_photos.py DEMO/

The photos that ship with scikit-image, scikit-learn and matplotlib (offline), longer side
320 px, as JPEG:

    DEMO/collection/photos/NAME.jpg       18 photos as they are
    DEMO/collection/tiles/NAME_RC.jpg     2 x 2 tiles of 6 of them (24 images)
    DEMO/collection/reposts/NAME.jpg      edited copies of 3 photos that are not in the
                                          collection: cropped (72 % of each side, off centre),
                                          shrunk to 60 %, JPEG quality 30
    DEMO/queries/NAME.jpg                 the 3 originals of those reposts

45 indexed images in all. Querying with DEMO/queries/rocket.jpg should find
reposts/rocket.jpg first: copy detection.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE = (
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
TILED = ("astronaut", "chelsea", "coffee", "china", "motorcycle", "camera")
REPOSTED = ("rocket", "grace_hopper", "flower")  # only their edited copies are indexed


def load(name: str) -> Image.Image:
    loader: Callable[[], np.ndarray]
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        def loader() -> np.ndarray:
            return np.asarray(load_sample_image(f"{name}.jpg"))
    elif name == "grace_hopper":
        import matplotlib.cbook

        def loader() -> np.ndarray:
            path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
            with Image.open(str(path)) as im:
                return np.asarray(im.convert("RGB"))
    else:
        import skimage.data

        def loader() -> np.ndarray:
            if name == "motorcycle":
                return np.asarray(skimage.data.stereo_motorcycle()[0])  # the left view
            return np.asarray(getattr(skimage.data, name)())

    im = Image.fromarray(loader()).convert("RGB")
    im.thumbnail((320, 320))
    return im


def repost(im: Image.Image) -> Image.Image:
    """What a copy found elsewhere looks like: cropped off centre and shrunk (saved below as
    a low-quality JPEG)."""
    w, h = im.size
    cw, ch = int(w * 0.72), int(h * 0.72)
    x, y = int((w - cw) * 0.7), int((h - ch) * 0.3)
    return im.crop((x, y, x + cw, y + ch)).resize((int(cw * 0.6), int(ch * 0.6)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    out = args.output
    for folder in ("collection/photos", "collection/tiles", "collection/reposts", "queries"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    names = [n for n in (*SKIMAGE, "china", "flower", "grace_hopper") if n not in REPOSTED]
    count = 0
    for name in names:
        im = load(name)
        im.save(out / "collection" / "photos" / f"{name}.jpg", quality=90)
        count += 1
        if name in TILED:
            w, h = im.size
            for r in range(2):
                for c in range(2):
                    tile = im.crop((c * w // 2, r * h // 2, (c + 1) * w // 2, (r + 1) * h // 2))
                    tile.save(out / "collection" / "tiles" / f"{name}_{r}{c}.jpg", quality=90)
                    count += 1
    for name in REPOSTED:
        im = load(name)
        im.save(out / "queries" / f"{name}.jpg", quality=90)
        repost(im).save(out / "collection" / "reposts" / f"{name}.jpg", quality=30)
        count += 1
    print(f"{count} images in {out / 'collection'}, {len(REPOSTED)} queries in {out / 'queries'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
