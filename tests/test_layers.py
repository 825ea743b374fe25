"""The layering contracts of pyproject's [tool.importlinter] hold, and each one fails on the break
it exists to stop (checked on a copy of the packages with one import added)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = {
    "layers": "The server's request path: transport -> pipeline/batcher -> runtime -> ops",
    "torch-free": "Transport and request validation never import torch (or what needs it)",
    "client": "The client installs without torch and never imports the server",
    "common": "layertap.common is shared by both sides and imports neither",
    "ray": "layertap.ray needs only the client; the server only in LocalExtractor",
    "acyclic": "No import cycles between modules",
}


def _lint(cwd: Path, pythonpath: Path | None = None) -> dict[str, str]:
    """Run lint-imports in `cwd`; {contract name: KEPT | BROKEN}."""
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} missing: install the dev extra (make setup)"
    env = None
    if pythonpath is not None:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    done = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    verdicts = {}
    for line in done.stdout.splitlines():
        for name in CONTRACTS.values():
            if line.startswith(name + " "):
                verdicts[name] = line[len(name) + 1 :].split()[0]
    assert set(verdicts) == set(CONTRACTS.values()), done.stdout + done.stderr
    assert (done.returncode == 0) == all(v == "KEPT" for v in verdicts.values()), done.stdout
    return verdicts


def test_every_contract_holds() -> None:
    assert set(_lint(ROOT).values()) == {"KEPT"}


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packages under a `layertap/` namespace of their own, plus the contracts."""
    root = tmp_path_factory.mktemp("layers")
    for package in ("server", "client", "common"):
        shutil.copytree(ROOT / package, root / "layertap" / package)
    shutil.copytree(ROOT / "integrations" / "ray", root / "layertap" / "ray")
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


# (module file in the copy, line appended, contracts that must break)
BREAKS = [
    ("server/requests.py", "import torch", {"torch-free"}),
    ("server/service.py", "from layertap.server import pipeline", {"torch-free"}),
    # a lower layer reaching up (pipeline imports spec: a cycle too)
    ("server/spec.py", "from layertap.server import pipeline", {"layers", "torch-free", "acyclic"}),
    ("server/worker.py", "from layertap.server import service", {"layers"}),
    ("server/errors.py", "from layertap.server import spec", {"layers", "acyclic"}),
    ("client/_requests.py", "from layertap.server import spec", {"client", "ray"}),
    ("ray/_batches.py", "import torch", {"ray"}),
    ("ray/_extractor.py", "from layertap.server import spec", {"ray"}),
    ("ray/__init__.py", "import ray", {"ray"}),
    ("common/options.py", "from layertap.client import errors", {"common"}),
]


@pytest.mark.parametrize(("path", "line", "broken"), BREAKS, ids=[b[0] for b in BREAKS])
def test_each_break_is_caught(copy: Path, path: str, line: str, broken: set[str]) -> None:
    target = copy / "layertap" / path
    original = target.read_text()
    target.write_text(original + f"\n{line}  # noqa\n")
    try:
        verdicts = _lint(copy, pythonpath=copy)
    finally:
        target.write_text(original)
    assert {k for k, name in CONTRACTS.items() if verdicts[name] == "BROKEN"} == broken


def test_validation_and_transport_import_without_torch() -> None:
    """What the contracts promise, seen by the interpreter: no torch in sys.modules."""
    code = (
        "import sys\n"
        "import layertap.server.service, layertap.server.requests, layertap.server.rpc\n"
        "import layertap.server.responses, layertap.common.options, layertap.common.heads_format\n"
        "loaded = sorted(m for m in ('torch', 'torchvision', 'PIL') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
