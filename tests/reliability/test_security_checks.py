"""Security properties of the request path, checked on the code and against live servers.

1. The code: every `torch.load` passes weights_only=True; nothing in server/ or client/ uses
   pickle, marshal, eval, exec or __import__; importlib's import_module is called only by
   server/models.py's import_object, and import_object only with config values.
2. The load paths: a weights file (local .pth/.pt/.bin, or a torchvision cache file) holding a
   pickle whose __reduce__ would create a marker file fails to load with a clear message, and
   the marker never appears (the same payload does create it when unpickled without
   weights_only, so the check is not vacuous).
3. Fields that look like paths or modules (model, nodes, aliases, image bytes, dtypes): refused
   with documented statuses, and a process-wide audit hook sees no import of the named module,
   no open() of the named files, no unpickling and no process spawn while they are served.
4. Bearer tokens: every FeatureService RPC (enumerated from the proto) is denied without a
   token (UNAUTHENTICATED) or with a wrong one (PERMISSION_DENIED); health and reflection are
   open only with auth_open_health; method paths that merely start like an open service are
   not a way around the check.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import pickle
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from conftest import RunningServer, encode, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from layertap.server.settings import ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "server").rglob("*.py"), *(ROOT / "client").rglob("*.py")])
TINY = ModelConfig(
    name="tiny",
    factory="factories:tiny_net",
    kwargs={"width": 4},
    weights="none",
    allow_random=True,
    input_size=(32, 32),
)
MARKER_MODULE = "lt_marker_mod"


@pytest.fixture(scope="module")
def quiet() -> Iterator[None]:
    logger = logging.getLogger("layertap")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # expected load failures and client errors
    yield
    logger.setLevel(level)


# --------------------------------------------------------------------------- 1. the code


def _trees() -> list[tuple[str, ast.Module]]:
    assert SOURCES, "no sources found"
    return [(str(p.relative_to(ROOT)), ast.parse(p.read_text(), str(p))) for p in SOURCES]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _enclosing_functions(tree: ast.Module) -> dict[ast.AST, str]:
    """node -> name of the innermost function around it (ast.walk visits outer ones first)."""
    owner: dict[ast.AST, str] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.walk(fn):
                if child is not fn:
                    owner[child] = fn.name
    return owner


def test_every_torch_load_is_weights_only() -> None:
    loads = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func) in ("torch.load", "load"):
                if _dotted(node.func) == "load" and not _imports_torch_load(tree):
                    continue
                kw = {k.arg: k.value for k in node.keywords}
                value = kw.get("weights_only")
                ok = isinstance(value, ast.Constant) and value.value is True
                loads.append((path, node.lineno, ok))
    assert loads, "expected the local-weights loader to call torch.load"
    assert all(ok for _, _, ok in loads), [x for x in loads if not x[2]]
    # torchvision's own loader (enum weights) is forced to weights_only by the environment
    models_src = (ROOT / "server" / "sources" / "torchvision_models.py").read_text()
    assert 'os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"' in models_src


def _imports_torch_load(tree: ast.Module) -> bool:
    return any(
        isinstance(n, ast.ImportFrom)
        and n.module == "torch"
        and any(a.name == "load" for a in n.names)
        for n in ast.walk(tree)
    )


FORBIDDEN_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "marshal",
    "shelve",
    "dill",
    "cloudpickle",
    "joblib",
    "jsonpickle",
}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "execfile", "input"}
# loaders that run code from the file they read (TorchScript, torch.hub repos, torch.package)
UNSAFE_LOADERS = ("jit.load", "hub.load", "PackageImporter", "pickle.loads", "pickle.load")


def test_no_pickle_marshal_eval_exec_or_dunder_import() -> None:
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [
                    (path, node.lineno, a.name)
                    for a in node.names
                    if a.name.split(".")[0] in FORBIDDEN_MODULES
                ]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[0] in FORBIDDEN_MODULES:
                    found.append((path, node.lineno, node.module))
            elif isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name in FORBIDDEN_CALLS or name.endswith(UNSAFE_LOADERS):
                    found.append((path, node.lineno, name))
                if name in ("np.load", "numpy.load"):  # numpy arrays only, never object pickles
                    kw = {k.arg: k.value for k in node.keywords}
                    value = kw.get("allow_pickle")
                    if not (isinstance(value, ast.Constant) and value.value is False):
                        found.append((path, node.lineno, f"{name} without allow_pickle=False"))
            elif isinstance(node, ast.Name) and node.id == "__import__":
                found.append((path, node.lineno, "__import__"))
    assert not found, found


# Every place a string becomes an imported object, and the config value it comes from.
# A new call site fails here on purpose: check that it cannot see request data, then add it.
IMPORT_SITES = {
    ("server/models.py", "import_object", "importlib.import_module(module_name)"),
    # a factory given as a config-relative .py file (import_object's only other branch)
    ("server/models.py", "_import_file", "spec.loader.exec_module(module)"),
    ("server/sources/factory.py", "build", "import_object(cfg.factory)"),
    # whether a source's optional package is installed (a fixed name, never imported here)
    ("server/model_config.py", "_source", "importlib.util.find_spec(package)"),
    # whether this transformers has its fx tracer (a fixed name, never imported here)
    (
        "server/sources/hf_models.py",
        "<module>",
        "importlib.util.find_spec('transformers.utils.fx')",
    ),
    ("server/loading.py", "_import_all", "model_loading.import_object(s)"),
    ("server/loading.py", "_catalog", "_import_all(cfg.leaf_modules)"),
    ("server/loading.py", "_catalog", "_import_all(cfg.autowrap_functions)"),
}


def test_imports_by_name_come_from_config_only() -> None:
    sites = set()
    for path, tree in _trees():
        owner = _enclosing_functions(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name.split(".")[-1] in (
                    "import_module",
                    "import_object",
                    "_import_all",
                    "find_spec",
                    "load_module",
                    "exec_module",
                ):
                    sites.add((path, owner.get(node, "<module>"), ast.unparse(node)))
    assert sites == IMPORT_SITES
    # the functions around them take a ModelConfig, which only settings build
    for path, fn, arg in [
        ("server/sources/factory.py", "build", "cfg"),
        ("server/sources/__init__.py", "build_model", "cfg"),
        ("server/loading.py", "load", "cfg"),
        ("server/loading.py", "_catalog", "cfg"),
    ]:
        tree = ast.parse((ROOT / path).read_text())
        defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == fn]
        assert len(defs) == 1
        annotation = {a.arg: ast.unparse(a.annotation) for a in defs[0].args.args if a.annotation}
        assert annotation[arg] == "ModelConfig", (path, fn, annotation)
    # the transport never builds configs or models from a request
    service = ast.parse((ROOT / "server" / "service.py").read_text())
    names = {_dotted(n) for n in ast.walk(service) if isinstance(n, (ast.Name, ast.Attribute))}
    assert not names & {"ModelConfig", "build_model", "import_object", "load_all", "ModelLoader"}
    # the loader's callers (ModelLoader.load, through ModelRuntime._loader): load_all only,
    # which iterates settings.models
    worker = ast.parse((ROOT / "server" / "worker.py").read_text())
    owner = _enclosing_functions(worker)
    callers = {
        owner.get(n) for n in ast.walk(worker) if isinstance(n, ast.Attribute) and n.attr == "load"
    }
    assert callers == {"load_all"}, callers
    assert "for cfg in self.settings.models" in ast.unparse(
        next(
            n
            for n in ast.walk(worker)
            if isinstance(n, ast.AsyncFunctionDef) and n.name == "load_all"
        )
    )


# --------------------------------------------------------------------------- 2. load paths


class Payload:
    """Unpickling this calls open(marker, "w"): code execution, observable as a new file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _malicious_files(tmp: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (weights file, the marker its unpickling would create)."""
    files = {}
    for name, writer in [
        ("zip.pth", lambda p, m: torch.save({"conv.weight": Payload(m)}, p)),
        (
            "legacy.pt",
            lambda p, m: torch.save({"w": Payload(m)}, p, _use_new_zipfile_serialization=False),
        ),
        ("plain.bin", lambda p, m: p.write_bytes(pickle.dumps({"w": Payload(m)}, protocol=2))),
    ]:
        path, marker = tmp / name, tmp / f"{name}.pwned"
        writer(path, marker)
        files[name] = (path, marker)
    return files


def test_payloads_are_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: without weights_only the payloads do run (so the server test means something)."""
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    files = _malicious_files(tmp_path)
    for name, (path, marker) in files.items():
        if name.endswith(".bin"):
            loaded = pickle.loads(path.read_bytes())
        else:
            loaded = torch.load(path, weights_only=False)
        for handle in loaded.values():  # the file objects open() returned
            handle.close()
        assert marker.exists(), name


@dataclass
class Tap:
    """What an audit hook saw while `active`: imports, opens, unpickling, process spawns."""

    active: bool = False
    events: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    WATCH = (
        "import",
        "open",
        "pickle.find_class",
        "os.system",
        "subprocess.Popen",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "ctypes.dlopen",
    )

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or not event.startswith(self.WATCH):
            return
        first = args[0] if args else ""
        text = os.fsdecode(first) if isinstance(first, (str, bytes, os.PathLike)) else str(first)
        with self.lock:
            self.events.append((event, text))

    def seen(self, event: str) -> list[str]:
        with self.lock:
            return [t for e, t in self.events if e.startswith(event)]


TAP = Tap()
_HOOKED = False


@pytest.fixture()
def tap() -> Iterator[Tap]:
    global _HOOKED
    if not _HOOKED:  # audit hooks cannot be removed: one, switched on only inside tests
        sys.addaudithook(TAP)
        _HOOKED = True
    TAP.events.clear()
    TAP.active = True
    yield TAP
    TAP.active = False


@pytest.fixture(scope="module")
def poisoned(
    tmp_path_factory: pytest.TempPathFactory, quiet: None
) -> Iterator[tuple[RunningServer, dict[str, tuple[Path, Path]], Path]]:
    """A server whose weights files (local and in the torchvision cache) carry payloads."""
    tmp = tmp_path_factory.mktemp("poison")
    files = _malicious_files(tmp)
    torch_home = tmp / "torch_home"
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    cache_marker = tmp / "cache.pwned"
    # the exact file name torchvision looks for: resnet18 IMAGENET1K_V1
    from torchvision.models import ResNet18_Weights

    cached = checkpoints / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    torch.save({"conv1.weight": Payload(cache_marker)}, cached)
    files["torchvision cache"] = (cached, cache_marker)
    models = (
        [TINY]
        + [
            ModelConfig(name=f"evil-{name.split('.')[0]}", arch="resnet18", weights=str(path))
            for name, (path, _) in files.items()
            if name != "torchvision cache"
        ]
        + [ModelConfig(name="evil-cache", arch="resnet18", weights="IMAGENET1K_V1")]
    )
    old_home = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(torch_home)
    try:
        running = start_server(Settings(port=0, models=tuple(models), log_level="ERROR"))
    finally:
        if old_home is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old_home
    yield running, files, tmp
    running.stop()


def test_pickled_weights_never_execute(
    poisoned: tuple[RunningServer, dict[str, tuple[Path, Path]], Path],
) -> None:
    running, files, _ = poisoned
    for name, (_, marker) in files.items():
        assert not marker.exists(), f"{name}: the payload ran"
    stub = running.stub()
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert models["tiny"].ready
    for name in ("evil-zip", "evil-legacy", "evil-plain", "evil-cache"):
        assert not models[name].ready, name
        assert (
            "weights_only" in models[name].status_message
            or "Weights only" in models[name].status_message
        ), (name, models[name].status_message)
        with pytest.raises(grpc.RpcError) as info:
            stub.Extract(
                pb.ExtractRequest(model=name, nodes=["fc"], images=[pb.Image(encoded=b"x")]),
                timeout=30,
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed to load" in info.value.details()
    for name, (_, marker) in files.items():
        assert not marker.exists(), f"{name}: the payload ran"


def test_load_errors_name_the_file_and_are_plain_text(
    poisoned: tuple[RunningServer, dict[str, tuple[Path, Path]], Path],
) -> None:
    """A refused checkpoint is a clear, loggable message: it names the file that was refused and
    carries no terminal escape codes (torch's own message has ANSI bold)."""
    running, files, _ = poisoned
    models = {m.name: m for m in running.stub().ListModels(pb.ListModelsRequest()).models}
    for name, key in (
        ("evil-zip", "zip.pth"),
        ("evil-legacy", "legacy.pt"),
        ("evil-plain", "plain.bin"),
        ("evil-cache", "torchvision cache"),
    ):
        message = models[name].status_message
        assert "\x1b" not in message, (name, message)
        assert files[key][0].name in message, (name, message)


# --------------------------------------------------------------------------- 3. fields


@dataclass
class Probe:
    what: str
    request: pb.ExtractRequest | pb.DescribeModelRequest
    expected: grpc.StatusCode


def _probes(tmp: Path, weights: Path) -> list[Probe]:
    png_file = tmp / "secret.png"
    png_file.write_bytes(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    image = pb.Image(encoded=encode(np.full((32, 32, 3), 128, np.uint8), "PNG"))
    module = f"{MARKER_MODULE}:build"
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

    def extract(**kw: Any) -> pb.ExtractRequest:
        base: dict[str, Any] = {"model": "tiny", "images": [image], "nodes": ["pools"]}
        base.update(kw)
        return pb.ExtractRequest(**base)

    probes = []
    for model in (
        "../../etc/passwd",
        "/etc/passwd",
        "os:system",
        "torchvision.models:resnet18",
        "resnet50",
        "vgg16",
        module,
        MARKER_MODULE,
        str(weights),
        f"file://{weights}",
        "factories:tiny_net",
        "factories:gated_net",
    ):
        probes.append(Probe(f"model {model}", extract(model=model), not_found))
        probes.append(Probe(f"describe {model}", pb.DescribeModelRequest(model=model), not_found))
    for node in (
        "__import__('os')",
        "../x",
        "../../etc/passwd",
        module,
        MARKER_MODULE,
        str(png_file),
        "os.system",
        "factories.tiny_net",
    ):
        probes.append(Probe(f"node {node}", extract(nodes=[node]), invalid))
        probes.append(Probe(f"alias of {node}", extract(aliases={node: "k"}), invalid))
    for data in (
        b"/etc/passwd",
        str(png_file).encode(),
        f"file://{png_file}".encode(),
        module.encode(),
        b"\x80\x04\x95" + pickle.dumps(Payload(tmp / "x"))[3:],
    ):
        probes.append(
            Probe(f"image bytes {data[:30]!r}", extract(images=[pb.Image(encoded=data)]), invalid)
        )
    for dtype in (module, "torch.float32", "numpy.float64", "__import__('os')"):
        tensor = pb.Tensor(dtype=dtype, shape=[4, 4, 3], data=bytes(48))
        probes.append(
            Probe(f"tensor dtype {dtype}", extract(images=[pb.Image(tensor=tensor)]), invalid)
        )
        probes.append(
            Probe(f"output dtype {dtype}", extract(output=pb.OutputOptions(dtype=dtype)), invalid)
        )
    # an alias is only an output key: a path-like one is returned verbatim, nothing more
    probes.append(
        Probe(
            "alias value /etc/passwd", extract(aliases={"pools": "/etc/passwd"}), grpc.StatusCode.OK
        )
    )
    return probes


@pytest.fixture(scope="module")
def field_server(quiet: None) -> Iterator[RunningServer]:
    running = start_server(Settings(port=0, models=(TINY,), log_level="ERROR"))
    yield running
    running.stop()


def test_path_and_module_fields_are_refused_without_side_effects(
    field_server: RunningServer, tmp_path: Path, tap: Tap, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported.pwned"
    (tmp_path / f"{MARKER_MODULE}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "def build():\n    raise RuntimeError('never')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert importlib.util.find_spec(MARKER_MODULE) is not None  # importable, were anyone to try
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    probes = _probes(tmp_path, weights)
    channel = field_server.channel()
    stub = field_server.stub()
    stub.Extract(
        pb.ExtractRequest(
            model="tiny",
            nodes=["pools"],
            images=[pb.Image(encoded=encode(np.zeros((32, 32, 3), np.uint8), "PNG"))],
        ),
        timeout=30,
    )  # warm
    control = tmp_path / "control.txt"
    worker = threading.Thread(target=control.write_text, args=("seen",))
    worker.start()
    worker.join()
    assert str(control) in tap.seen("open"), "the audit hook does not see other threads"
    TAP.events.clear()
    results = []
    for probe in probes:
        method = (
            stub.DescribeModel
            if isinstance(probe.request, pb.DescribeModelRequest)
            else (stub.Extract)
        )
        try:
            method(probe.request, timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        results.append((probe.what, code, probe.expected))
    channel.close()
    wrong = [r for r in results if r[1] != r[2]]
    assert not wrong, wrong
    named = {"/etc/passwd", str(weights), str(tmp_path / "secret.png"), str(marker)}
    assert not [p for p in tap.seen("open") if p in named or MARKER_MODULE in p]
    assert not [m for m in tap.seen("import") if MARKER_MODULE in m or m == "factories"]
    assert not tap.seen("pickle.find_class")
    for spawn in ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"):
        assert not tap.seen(spawn), spawn
    assert not marker.exists()
    assert MARKER_MODULE not in sys.modules
    # nothing unconfigured was loaded or listed
    assert [m.name for m in stub.ListModels(pb.ListModelsRequest()).models] == ["tiny"]
    assert field_server.server.runtime.ready_models() == ["tiny"]


# --------------------------------------------------------------------------- 4. tokens

TOKEN = "t1"


@pytest.fixture(scope="module", params=[True, False], ids=["health-open", "health-closed"])
def auth_server(request: pytest.FixtureRequest, quiet: None) -> Iterator[RunningServer]:
    running = start_server(
        Settings(
            port=0,
            models=(TINY,),
            auth_tokens=TOKEN,
            auth_open_health=request.param,
            log_level="ERROR",
        )
    )
    yield running
    running.stop()


def _feature_calls() -> list[tuple[str, Any, Any]]:
    """(method path, request, response class) for every FeatureService RPC in the proto."""
    image = pb.Image(encoded=encode(np.zeros((32, 32, 3), np.uint8), "PNG"))
    valid = {
        "ListModels": pb.ListModelsRequest(),
        "DescribeModel": pb.DescribeModelRequest(model="tiny"),
        "Extract": pb.ExtractRequest(model="tiny", nodes=["pools"], images=[image]),
        "ExtractStream": pb.ExtractStreamRequest(
            id="a", request=pb.ExtractRequest(model="tiny", nodes=["pools"], images=[image])
        ),
        "GetServerInfo": pb.GetServerInfoRequest(),
        "GetParameters": pb.GetParametersRequest(model="tiny", names=["stem.0.weight"]),
        "Compare": pb.CompareRequest(model="tiny", a=[image], b=[image], nodes=["pools"]),
    }
    service = pb.DESCRIPTOR.services_by_name["FeatureService"]
    calls = []
    for method in service.methods:
        assert method.client_streaming == method.server_streaming, method.name
        assert method.name in valid, f"add a valid request for the new RPC {method.name}"
        response = getattr(pb, method.output_type.name)
        calls.append((f"/{service.full_name}/{method.name}", valid[method.name], response))
    return calls


def _code(channel: grpc.Channel, path: str, req: Any, resp: Any, metadata: Any) -> Any:
    kind = {"serializer": type(req).SerializeToString}
    try:
        if isinstance(req, pb.ExtractStreamRequest):  # bidi: one item, every answer read
            stream = channel.stream_stream(
                path, request_serializer=kind["serializer"], response_deserializer=resp.FromString
            )
            answers = list(stream(iter([req]), metadata=metadata, timeout=30))
            assert [a.WhichOneof("result") for a in answers] == ["response"], answers
        else:
            call = channel.unary_unary(
                path, request_serializer=kind["serializer"], response_deserializer=resp.FromString
            )
            call(req, metadata=metadata, timeout=30)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_every_feature_rpc_needs_the_token(auth_server: RunningServer) -> None:
    with grpc.insecure_channel(auth_server.target) as channel:
        for path, req, resp in _feature_calls():
            assert _code(channel, path, req, resp, None) == grpc.StatusCode.UNAUTHENTICATED, path
            for bad in (
                ("authorization", "Bearer t2"),
                ("authorization", "Bearer T1"),
                ("authorization", "Bearer t1t1"),
                ("authorization", "Bearer t"),
            ):
                assert _code(channel, path, req, resp, (bad,)) == (
                    grpc.StatusCode.PERMISSION_DENIED
                ), (path, bad)
            for bad in (
                ("authorization", "t1"),
                ("x-authorization", "Bearer t1"),
                ("authorization", "Basic t1"),
            ):
                assert _code(channel, path, req, resp, (bad,)) == (
                    grpc.StatusCode.UNAUTHENTICATED
                ), (path, bad)
            good = (("authorization", f"Bearer {TOKEN}"),)
            assert _code(channel, path, req, resp, good) == grpc.StatusCode.OK, path


def _reflection_services(channel: grpc.Channel, metadata: Any) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=30))
    return [s.name for s in replies[0].list_services_response.service]


def test_health_and_reflection_open_only_when_configured(auth_server: RunningServer) -> None:
    open_health = auth_server.server.settings.auth_open_health
    good = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(auth_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="layertap.v1.FeatureService")
        assert health.Check(check, metadata=good, timeout=30).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        assert "layertap.v1.FeatureService" in _reflection_services(channel, good)
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            if open_health:
                assert health.Check(check, metadata=metadata, timeout=30).status == (
                    health_pb2.HealthCheckResponse.SERVING
                )
                assert "layertap.v1.FeatureService" in _reflection_services(channel, metadata)
            else:
                expected = (
                    grpc.StatusCode.UNAUTHENTICATED
                    if metadata is None
                    else grpc.StatusCode.PERMISSION_DENIED
                )
                with pytest.raises(grpc.RpcError) as info:
                    health.Check(check, metadata=metadata, timeout=30)
                assert info.value.code() == expected
                with pytest.raises(grpc.RpcError) as info:
                    _reflection_services(channel, metadata)
                assert info.value.code() == expected


def test_open_prefixes_are_not_a_way_around_the_token(auth_server: RunningServer) -> None:
    """Paths that start like an open service but name a FeatureService method go nowhere."""
    req, resp = pb.ListModelsRequest(), pb.ListModelsResponse
    with grpc.insecure_channel(auth_server.target) as channel:
        for path in (
            "/grpc.health.v1.Health/../layertap.v1.FeatureService/ListModels",
            "/grpc.health.v1.Health/Check/../../layertap.v1.FeatureService/ListModels",
            "/grpc.reflection.v1alpha.ServerReflection/ListModels",
            "/grpc.reflection.layertap.v1.FeatureService/ListModels",
            "/layertap.v1.FeatureService/ListModels/",
            "/LAYERTAP.V1.FEATURESERVICE/LISTMODELS",
        ):
            code = _code(channel, path, req, resp, None)
            assert code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED), (
                path,
                code,
            )


def test_an_unauthenticated_extract_runs_nothing(auth_server: RunningServer) -> None:
    """Denied before the handler: no extractor is built for the node set it asked for."""
    image = pb.Image(encoded=encode(np.zeros((64, 64, 3), np.uint8), "PNG"))
    req = pb.ExtractRequest(model="tiny", nodes=["stem.0"], images=[image] * 3)
    extractors = auth_server.server.runtime._models["tiny"].extractors
    with grpc.insecure_channel(auth_server.target) as channel:
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            code = _code(
                channel, "/layertap.v1.FeatureService/Extract", req, pb.ExtractResponse, metadata
            )
            assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert ("stem.0",) not in extractors
