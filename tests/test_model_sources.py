"""Model sources in the config (server/model_config.py, server/sources/): which keys each source
takes, the start-up errors for the entries users get wrong, and the digest of a factory's own
weights. The sources' parity with their libraries is tested per source (test_source_*.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from layertap.server.config_types import ConfigError
from layertap.server.model_config import ModelConfig, parse_model
from layertap.server.models import state_sha256
from layertap.server.settings import load_settings
from layertap.server.sources import build_model


def _load(tmp_path: Path, text: str) -> Any:
    config = tmp_path / "layertap.toml"
    config.write_text(text)
    return load_settings(["--config", str(config)], env={})


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('source = "timm"\n', "source 'timm' needs 'arch'"),
        ('source = "huggingface"\narch = "vit"\n', "source 'huggingface' needs 'path'"),
        ('source = "export"\npath = "m.pt2"\narch = "x"\n', "takes 'path', not arch"),
        ('path = "m.pt2"\n', "give exactly one of 'arch' or 'factory' (or source ="),
        ('source = "onnx"\npath = "m.onnx"\n', "source must be one of"),
        ('arch = "resnet18"\nfactory = "a:b"\n', "give exactly one of 'arch' or 'factory'"),
    ],
)
def test_each_source_takes_its_own_key(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, f'[[models]]\nname = "m"\n{entry}')
    assert message in str(err.value)


def test_a_missing_extra_fails_at_start_up_with_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    gone = {"timm", "transformers"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"the timm package.*pip install 'layertap\[timm\]'"):
        _load(tmp_path, '[[models]]\nname = "m"\nsource = "timm"\narch = "resnet18"\n')
    with pytest.raises(ConfigError, match=r"transformers package.*'layertap\[hf\]'"):
        _load(tmp_path, '[[models]]\nname = "m"\nsource = "huggingface"\npath = "clip"\n')


def test_paths_are_relative_to_the_config_and_sources_default(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        '[[models]]\nname = "e"\nsource = "export"\npath = "artifacts/m.pt2"\n'
        '[[models]]\nname = "r"\narch = "resnet18"\n'
        '[[models]]\nname = "f"\nfactory = "factories:tiny_net"\n',
    )
    by_name = {m.name: m for m in settings.models}
    assert by_name["e"].path == str(tmp_path / "artifacts" / "m.pt2")
    assert (by_name["e"].source, by_name["r"].source, by_name["f"].source) == (
        "export",
        "torchvision",
        "factory",
    )
    assert ModelConfig(name="x", factory="a:b").source == "factory"  # built in code, the same
    assert parse_model({"name": "y", "arch": "resnet18"}).source == "torchvision"


def test_a_factorys_own_weights_are_digested_from_its_state() -> None:
    """Never "factory": the digest of the weights the module holds, equal for equal weights and
    different when one value changes."""
    cfg = ModelConfig(name="t", factory="factories:tiny_net", kwargs={"width": 4})
    torch.manual_seed(0)
    first = build_model(cfg)
    torch.manual_seed(0)
    again = build_model(cfg)
    assert first.sha256 == again.sha256 == state_sha256(first.module)
    assert first.sha256.startswith("state:") and len(first.sha256) == len("state:") + 64
    assert first.weights_id == "factory" and not first.random
    with torch.no_grad():
        next(first.module.parameters()).view(-1)[0] += 1
    assert state_sha256(first.module) != again.sha256
