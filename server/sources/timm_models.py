"""timm models: any timm.list_models() architecture (a pretrained tag such as
"convnext_atto.d2_in1k" allowed), built with pretrained=False, then given a local weights file,
timm's own pretrained weights when they are already in the local Hugging Face / torch hub cache
(never downloaded), or random init.

Preprocessing is the model's resolved data config (timm.data.resolve_data_config: input size,
interpolation, crop_pct, crop_mode, mean/std) with the arithmetic of timm's eval transform;
descriptions Preprocessing cannot express fail the load naming the keys that would override
them. Tracing uses timm's own fx rules (its registered leaf modules and autowrapped functions),
so node names are those of timm's get_graph_node_names and create_feature_extractor."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import timm.data
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import nn

from ..model_config import ModelConfig
from ..models import (
    RANDOM,
    LoadedWeights,
    ModelLoadError,
    apply_overrides,
    built,
    is_file_spec,
    load_state_dict_file,
    sha256_file,
)
from ..preprocess import Preprocessing

log = logging.getLogger("layertap.server.models")

# timm's eval interpolations that Preprocessing has (timm also knows box, hamming, lanczos)
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# kwargs that would make timm fetch or read weights itself: weights come from `weights` only
_REFUSED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
# timm's Hugging Face file names (timm.models._hub): the pickle name and its safetensors twins
_HF_WEIGHTS = "pytorch_model.bin"
_SAFE_TWINS = {
    "pytorch_model.bin": "model.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
}


def _offline() -> None:
    """Nothing downloads at run time: the Hugging Face hub client refuses network calls in
    this process (the environment variable for libraries imported later, the constant for
    huggingface_hub, already imported by timm)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _check_arch(cfg: ModelConfig) -> str:
    """The entry's timm name, or a load error with the closest timm names."""
    arch = str(cfg.arch)
    if ":" in arch:  # hf-hub:org/name, local-dir:/path: configs fetched or read by timm itself
        raise ModelLoadError(
            f"model {cfg.name!r}: arch {arch!r}: source 'timm' takes a timm.list_models() name "
            "(optionally with a pretrained tag, 'convnext_atto.d2_in1k'); give a Hub model's "
            "weights as a local file in `weights`"
        )
    if not timm.is_model(arch):
        base = arch.split(".")[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; closest timm names: {', '.join(close)}" if close else ""
        raise ModelLoadError(
            f"model {cfg.name!r}: {arch!r} is not a timm model{hint} "
            "(timm.list_models() lists them all)"
        )
    return arch


def _create(cfg: ModelConfig, arch: str, **extra: Any) -> nn.Module:
    """timm.create_model with the entry's kwargs; timm's errors become load errors."""
    try:
        return timm.create_model(arch, **extra, **dict(cfg.kwargs))
    except Exception as exc:  # unknown tags, bad kwargs, a refused or corrupt file
        raise ModelLoadError(f"model {cfg.name!r}: cannot build timm's {arch}: {exc}") from exc


def _cached_pretrained(pretrained_cfg: dict[str, Any]) -> tuple[Path | None, str]:
    """timm's pretrained weights file for this config if the local cache holds it (the Hugging
    Face hub cache, or torch hub's checkpoints folder for URL-only weights), safetensors first
    as timm reads them; else None. Also where it was looked for, for the error."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models._builder import _resolve_pretrained_source

    load_from, location = _resolve_pretrained_source(pretrained_cfg)
    if load_from == "hf-hub":
        repo, filename = location if isinstance(location, tuple) else (location, _HF_WEIGHTS)
        repo, _, revision = repo.partition("@")
        names = [filename] if filename.endswith(".safetensors") else []
        twin = _SAFE_TWINS.get(filename) or (
            filename[: -len(".bin")] + ".safetensors" if filename.endswith(".bin") else None
        )
        names += [n for n in (twin, filename) if n and n not in names]
        cache = constants.HF_HUB_CACHE
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=cache, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found), found
        where = f"{cache}/models--{repo.replace('/', '--')} ({' or '.join(names)})"
        return None, where
    if load_from == "url":
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(location).path)
        return (path if path.is_file() else None), str(path)
    return None, "nowhere: timm describes no pretrained weights for it"


def _pretrained_cfg(module: nn.Module) -> dict[str, Any]:
    """timm's pretrained config of a built model (its weights' description)."""
    cfg = getattr(module, "pretrained_cfg", None)
    return dict(cfg) if isinstance(cfg, dict) else {}


def _load_file(cfg: ModelConfig, arch: str, module: nn.Module) -> tuple[str, str]:
    """The entry's weights file into the model (strict; safetensors, or .pth with
    weights_only=True); (weights id, sha256). A mismatch names the first keys at fault."""
    state = load_state_dict_file(cfg.weights)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip()[:240] for ln in str(exc).splitlines()[1:4] if ln.strip()]
        kwargs = f" with kwargs {dict(cfg.kwargs)}" if cfg.kwargs else ""
        call = f"timm.create_model({arch!r}{', **kwargs' if kwargs else ''})"
        raise ModelLoadError(
            f"model {cfg.name!r}: {cfg.weights} does not fit timm's {arch}{kwargs}: "
            + "; ".join(lines)
            + f" (expected the state dict of {call})"
        ) from exc
    return os.path.basename(cfg.weights), sha256_file(cfg.weights)


def _size(value: object) -> tuple[int, int] | None:
    """An img_size kwarg (int or (H, W)) as (H, W)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def data_config(cfg: ModelConfig, module: nn.Module) -> dict[str, Any]:
    """timm's resolved data config for the model as the entry builds it: an `input_size` key,
    else an `img_size` kwarg (timm keeps the pretrained size in its config), sets the size as
    timm's own `input_size` argument would."""
    size = cfg.input_size or _size(cfg.kwargs.get("img_size"))
    args = {"input_size": (3, int(size[0]), int(size[1]))} if size else {}
    return dict(timm.data.resolve_data_config(args, model=module))


def timm_preprocessing(cfg: ModelConfig, module: nn.Module) -> Preprocessing:
    """The data config as timm's eval transform applies it (transforms_imagenet_eval):
    crop_mode "center": shorter side to floor(size / crop_pct), centre crop; "squash": both
    sides to floor(size / crop_pct), centre crop; then the entry's other overrides. A "border"
    crop, a non-square centre crop (timm's ResizeKeepRatio) or an interpolation Preprocessing
    lacks fails the load unless the entry sets the keys that replace it."""
    dc = data_config(cfg, module)
    chans, h, w = (int(v) for v in dc["input_size"])
    crop_pct = float(dc.get("crop_pct") or timm.data.DEFAULT_CROP_PCT)
    crop_mode = str(dc.get("crop_mode") or "center")
    interpolation = str(dc["interpolation"])
    mean, std = tuple(float(m) for m in dc["mean"]), tuple(float(s) for s in dc["std"])
    where = f"model {cfg.name!r}: timm's data config for {cfg.arch} ({_describe(dc)})"
    if chans != 3 or len(mean) != 3 or len(std) != 3:
        raise ModelLoadError(f"{where} is not for RGB images; build it with in_chans=3")
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    resize = math.floor(min(h, w) / crop_pct)
    problems = []
    if interpolation not in _INTERPOLATIONS and not cfg.interpolation:
        problems.append(
            f"interpolation {interpolation!r} is not one of {', '.join(_INTERPOLATIONS)}; set "
            "interpolation in the entry"
        )
    if not cfg.resize_mode:
        shape_problem = _crop_problem(crop_mode, (h, w), scale, resize)
        if shape_problem:
            problems.append(
                shape_problem + "; set resize_mode ('shorter' or 'squash', with resize_size) "
                "in the entry, or a square input_size"
            )
    if problems:
        raise ModelLoadError(f"{where} cannot be applied exactly: {'; '.join(problems)}")
    base = Preprocessing(
        resize_size=resize,
        crop_size=(h, w),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=cfg.interpolation or interpolation,
        resize_mode=cfg.resize_mode or ("squash" if crop_mode == "squash" else "shorter"),
    )
    # the size is in the data config already: the entry's input_size is not applied twice
    return apply_overrides(dataclasses.replace(cfg, input_size=None), base, 1 / crop_pct)


def _crop_problem(
    crop_mode: str, crop: tuple[int, int], scale: tuple[int, int], resize: int
) -> str:
    """Why timm's resize for this crop mode (to `scale`) is not Preprocessing's resize of
    `resize` for this crop, or ""."""
    if crop_mode == "squash":
        squash = Preprocessing(resize, crop, (0.0,) * 3, (1.0,) * 3, resize_mode="squash")
        if squash.squash_size() != scale:
            return f"a squash to {scale[0]}x{scale[1]} is not the crop's shape scaled"
        return ""
    if crop_mode != "center":
        return f"crop_mode {crop_mode!r} is not supported ('border' fits the longer side and pads)"
    if scale[0] != scale[1]:
        return (
            f"a non-square centre crop {crop[0]}x{crop[1]} resizes by the smaller ratio per "
            "image (timm's ResizeKeepRatio), not the shorter side"
        )
    return ""


def _describe(dc: dict[str, Any]) -> str:
    keys = ("input_size", "interpolation", "crop_pct", "crop_mode")
    return ", ".join(f"{k} {dc.get(k)}" for k in keys)


def build(cfg: ModelConfig) -> LoadedWeights:
    """A timm architecture with its weights on the CPU, in eval mode, offline."""
    _offline()
    arch = _check_arch(cfg)
    refused = [k for k in _REFUSED_KWARGS if k in cfg.kwargs]
    if refused:
        raise ModelLoadError(
            f"model {cfg.name!r}: kwargs {', '.join(refused)} are not accepted; weights come "
            "from `weights` (a local file, DEFAULT from the local cache, or none)"
        )
    weights = cfg.weights
    if not (is_file_spec(weights) or weights.lower() in ("none", "default")):
        raise ModelLoadError(
            f"model {cfg.name!r}: weights {weights!r}: with source 'timm' give a local "
            ".safetensors/.pth file, DEFAULT (timm's pretrained weights, from the local cache) "
            "or none; a pretrained tag goes in arch ('convnext_atto.d2_in1k')"
        )
    if weights.lower() == "none" and not cfg.allow_random:
        raise ModelLoadError(f"model {cfg.name!r}: weights = 'none' needs allow_random = true")
    module = _create(cfg, arch, pretrained=False)
    random_init, note = False, ""
    sha, weights_id = RANDOM, RANDOM
    if weights.lower() == "none":
        random_init, note = True, "random init (weights = none)"
    elif is_file_spec(weights):
        weights_id, sha = _load_file(cfg, arch, module)
    else:
        cached, where = _cached_pretrained(_pretrained_cfg(module))
        if cached is None and not cfg.allow_random:
            raise ModelLoadError(
                f"model {cfg.name!r}: timm's pretrained weights for {arch} are not in the local "
                f"cache (looked in {where}; no downloads at run time); download them once "
                f"(timm.create_model({arch!r}, pretrained=True) on a machine with network, "
                "then copy the cache), give a local weights file, or set allow_random = true"
            )
        if cached is None:
            random_init, note = True, f"timm weights not cached ({where}): random init"
            log.warning("model %s: %s", cfg.name, note)
        else:
            # timm's own loading (its checkpoint filter, classifier adaptation) from that file
            overlay = {"file": str(cached), "source": "timm"}
            module = _create(cfg, arch, pretrained=True, pretrained_cfg_overlay=overlay)
            tag = _pretrained_cfg(module).get("tag")
            weights_id = f"{arch.split('.')[0]}.{tag}" if tag else arch
            sha = sha256_file(cached)
    prefix = getattr(module, "num_prefix_tokens", None)
    return built(
        cfg,
        module,
        (weights_id, sha),
        random_init,
        note,
        functools.partial(timm_preprocessing, module=module),
        leaf_modules=tuple(get_notrace_modules()),
        autowrap_functions=tuple(get_notrace_functions()),
        prefix_tokens=prefix if isinstance(prefix, int) and not isinstance(prefix, bool) else None,
        # Swin & co. fix their input size, so the catalogue cannot probe which dims are spatial
        map_layout="NHWC" if str(getattr(module, "output_fmt", "")).endswith("NHWC") else "",
    )
