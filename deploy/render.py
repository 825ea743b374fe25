"""Render a kustomization under deploy/k8s without a kustomize binary.

    python deploy/render.py deploy/k8s/overlays/gpu > layertap-gpu.yaml

Implements exactly the kustomize subset deploy/k8s uses, so `kubectl kustomize DIR` (or
`kustomize build DIR`) gives the same objects (tests/test_deploy.py compares them whenever
kubectl is installed):

- `resources`: YAML files and directories holding a kustomization (built recursively);
- `configMapGenerator`: `name` + `files`, with kustomize's content-hash name suffix, and every
  reference from a pod template (volumes, env, envFrom) renamed to match;
- `patches`: `path` to a strategic-merge patch that names its target by kind and name. Maps
  merge; containers, initContainers, env and volumes (by name), container ports (by
  containerPort) and volumeMounts (by mountPath) merge by key, patch items first as kustomize
  orders them; other lists are replaced; `null` deletes a key;
- `namespace`: set on every object;
- `images`: `name` with `newName` and/or `newTag`, in containers and initContainers.

Anything else (another kustomization key, a generator option, an inline or JSON 6902 patch)
is refused with an error rather than rendered differently from kustomize.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "patches",
    "namespace",
    "images",
}
# list field name -> merge key, for strategic-merge patches (the fields deploy/k8s patches)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
_GENERATED = "render.layertap/generated"  # internal marker, removed before output


class RenderError(ValueError):
    """The kustomization uses something this renderer does not implement."""


def _load_yaml_docs(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization(directory: Path) -> Obj:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            data = yaml.safe_load((directory / name).read_text()) or {}
            unknown = set(data) - SUPPORTED_KEYS
            if unknown:
                raise RenderError(f"{directory / name}: unsupported keys {sorted(unknown)}")
            return dict(data)
    raise RenderError(f"{directory}: no kustomization.yaml")


def config_map_hash(cm: Obj) -> str:
    """kustomize's name suffix: sha256 of the ConfigMap's JSON, first 10 hex digits, with
    0 1 3 a e mapped to g h k m t (api/hasher: encodeConfigMap + encode). kustomize 5 hashes the
    generated ConfigMap before it is named, so "name" is empty (checked against kubectl)."""
    data: Obj = {"kind": "ConfigMap", "name": "", "data": cm.get("data", {})}
    if "immutable" in cm:
        data["immutable"] = cm["immutable"]
    if cm.get("binaryData"):
        data["binaryData"] = cm["binaryData"]
    # Go's encoding/json: sorted keys, no spaces, HTML characters escaped
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _generate_config_maps(directory: Path, generators: Iterable[Obj]) -> list[Obj]:
    out = []
    for gen in generators:
        unknown = set(gen) - {"name", "files"}
        if unknown:
            raise RenderError(f"configMapGenerator {gen.get('name')}: unsupported {unknown}")
        data = {}
        for spec in gen.get("files", []):
            key, sep, rel = str(spec).partition("=")
            rel = rel if sep else key
            key = key if sep else Path(rel).name
            data[key] = (directory / rel).read_text()
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"], "annotations": {_GENERATED: "true"}},
                "data": data,
            }
        )
    return out


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Merge `patch` into `base` (both plain YAML data) the way kustomize does for our fields."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        by_key = {item[key]: item for item in base}
        patched = [
            strategic_merge(by_key[item[key]], item) if item[key] in by_key else item
            for item in patch
        ]
        patch_keys = {item[key] for item in patch}
        return patched + [item for item in base if item[key] not in patch_keys]
    return copy.deepcopy(patch)


def _apply_patches(directory: Path, patches: Iterable[Obj], objects: list[Obj]) -> None:
    for spec in patches:
        if set(spec) != {"path"}:
            raise RenderError(f"{directory}: only `patches: - path: FILE` is supported: {spec}")
        for patch in _load_yaml_docs(directory / spec["path"]):
            kind, name = patch["kind"], patch["metadata"]["name"]
            targets = [
                i
                for i, o in enumerate(objects)
                if (o["kind"], o["metadata"]["name"]) == (kind, name)
            ]
            if len(targets) != 1:
                raise RenderError(f"patch {spec['path']}: {kind}/{name} matches {len(targets)}")
            objects[targets[0]] = strategic_merge(objects[targets[0]], patch)


def _pod_spec(obj: Obj) -> Obj | None:
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return spec.get("template", {}).get("spec")
    if obj["kind"] == "Pod":
        return spec
    return None


def _containers(obj: Obj) -> list[Obj]:
    pod = _pod_spec(obj) or {}
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _split_image(image: str) -> tuple[str, str]:
    """'registry:5000/name:tag' -> ('registry:5000/name', 'tag'); digests are refused."""
    if "@" in image:
        raise RenderError(f"image {image}: digests are not supported")
    name, sep, tag = image.rpartition(":")
    return (name, tag) if sep and "/" not in tag else (image, "")


def _set_images(images: Iterable[Obj], objects: list[Obj]) -> None:
    for spec in images:
        unknown = set(spec) - {"name", "newName", "newTag"}
        if unknown:
            raise RenderError(f"images entry {spec.get('name')}: unsupported {unknown}")
        for obj in objects:
            for container in _containers(obj):
                name, tag = _split_image(container["image"])
                if name != spec["name"]:
                    continue
                new_name = spec.get("newName", name)
                new_tag = spec.get("newTag", tag)
                container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name


def _rename_config_maps(objects: list[Obj]) -> None:
    renamed = {}
    for obj in objects:
        annotations = obj["metadata"].get("annotations", {})
        if obj["kind"] == "ConfigMap" and annotations.pop(_GENERATED, None):
            if not annotations:
                del obj["metadata"]["annotations"]
            old = obj["metadata"]["name"]
            obj["metadata"]["name"] = renamed[old] = f"{old}-{config_map_hash(obj)}"
    for obj in objects:
        pod = _pod_spec(obj)
        if pod is None:
            continue
        for volume in pod.get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] in renamed:
                volume["configMap"]["name"] = renamed[volume["configMap"]["name"]]
        for container in _containers(obj):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref and ref["name"] in renamed:
                    ref["name"] = renamed[ref["name"]]
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef")
                if ref and ref["name"] in renamed:
                    ref["name"] = renamed[ref["name"]]


def _build(directory: Path) -> list[Obj]:
    k = _kustomization(directory)
    objects: list[Obj] = []
    for entry in k.get("resources", []):
        path = directory / entry
        objects += _build(path) if path.is_dir() else _load_yaml_docs(path)
    objects += _generate_config_maps(directory, k.get("configMapGenerator", []))
    _apply_patches(directory, k.get("patches", []), objects)
    if "namespace" in k:
        for obj in objects:
            obj["metadata"]["namespace"] = k["namespace"]
    _set_images(k.get("images", []), objects)
    return objects


def render(directory: str | Path) -> list[Obj]:
    """Every object the kustomization at `directory` produces, as plain data."""
    objects = _build(Path(directory))
    _rename_config_maps(objects)
    return objects


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python deploy/render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        objects = render(args[0])
    except (RenderError, OSError, KeyError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
