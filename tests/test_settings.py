"""Settings precedence (defaults < config [server] < env < flags) and the default config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from layertap.server.settings import (
    FIELDS,
    ConfigError,
    HeadConfig,
    ModelConfig,
    Settings,
    build_arg_parser,
    load_settings,
)


def test_every_field_has_a_reason_a_flag_and_an_env_var() -> None:
    """Each setting is declared once (config_types.setting): its help rides on the field, and
    every [server] setting gets its flag and LAYERTAP_ variable from that declaration."""
    fields = set(Settings.__dataclass_fields__) - {"models", "heads"}  # TOML tables
    assert fields == set(FIELDS)
    help_text = build_arg_parser().format_help()
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in help_text
        assert "LAYERTAP_" + name.upper() in help_text
    for cls in (Settings, ModelConfig, HeadConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"
    flags = {action.dest: action.help or "" for action in build_arg_parser()._actions}
    for name, why in FIELDS.items():
        assert flags[name].startswith(why), name  # --help shows the declared help


def test_precedence(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[server]\nport = 1111\nmax_batch_size = 3\nmax_wait_ms = 7\n")
    s = load_settings(
        ["--config", str(config), "--max-batch-size", "5"],
        env={"LAYERTAP_PORT": "2222", "LAYERTAP_MAX_BATCH_SIZE": "4"},
    )
    assert (s.port, s.max_batch_size, s.max_wait_ms) == (2222, 5, 7.0)
    assert s.models == ()


def test_embedded_default_config_serves_the_three_models() -> None:
    s = load_settings([], env={})
    by_name = {m.name: m for m in s.models}
    assert list(by_name) == ["mobilenet_v2", "resnet50", "vgg16"]
    assert by_name["mobilenet_v2"].weights == "IMAGENET1K_V1"
    assert not by_name["mobilenet_v2"].allow_random
    assert by_name["resnet50"].allow_random and by_name["vgg16"].allow_random


def test_relative_weight_paths_are_relative_to_the_config(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[[models]]\nname = "m"\narch = "resnet18"\nweights = "w/model.safetensors"\n'
    )
    s = load_settings(["--config", str(config)], env={})
    assert s.models[0].weights == str(tmp_path / "w/model.safetensors")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "unknown keys ['prot']"),
        ('[[models]]\nname = "a"\n', "exactly one of 'arch' or 'factory'"),
        ('[[models]]\nname = "a"\narch = "x"\nwieghts = "none"\n', "unknown keys ['wieghts']"),
        ('[[models]]\nname = "a"\narch = "x"\n[[models]]\nname = "a"\narch = "y"\n', "unique"),
        ("[server]\nmax_batch_size = -1\n", "max_batch_size"),
        ('[[models]]\nname = "a"\narch = "x"\nresize_kernel = "pil"\n', "resize_kernel"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_config_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(["--config", str(config)], env={})


M = '[[models]]\nname = "a"\narch = "resnet18"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a quoted boolean is a string, and a non-empty string is truthy: random weights served
        (
            M + 'allow_random = "false"\n',
            "allow_random must be a boolean (true or false, unquoted), got 'false' (a string)",
        ),
        (M + 'max_batch_size = "8"\n', "max_batch_size must be an integer, got '8' (a string)"),
        (M + "max_batch_size = 8.5\n", "max_batch_size must be an integer, got 8.5 (a number)"),
        (M + "fold_batchnorm = 1\n", "fold_batchnorm must be a boolean"),
        (M + 'input_size = "224"\n', "input_size must be a list of integers, got '224'"),
        (M + 'mean = [0.5, "0.5", 0.5]\n', "mean must be a list of numbers"),
        (
            M + 'warmup_nodes = "layer1"\n',
            "warmup_nodes must be a list of strings or lists of strings, got 'layer1' (a string)",
        ),
        (M + 'kwargs = "width=4"\n', "kwargs must be a table"),
        (M + "weights = 3\n", "weights must be a string, got 3 (an integer)"),
        ('[[heads]]\nname = "h"\nfile = 3\n', "head entry 'h': file must be a string"),
        ("[server]\nmetrics = 0\n", "[server]: metrics must be a boolean"),
        ("[server]\nport = true\n", "[server]: port must be an integer, got True (a boolean)"),
        ("[server]\nmax_wait_ms = [2]\n", "[server]: max_wait_ms must be a number"),
        ("[server]\nprot = 1\n", "unknown keys ['prot'] (did you mean 'port'?)"),
        (M + 'wieghts = "none"\n', "unknown keys ['wieghts'] (did you mean 'weights'?)"),
        ('[[heads]]\nname = "h"\nfiel = "h.npz"\n', "(did you mean 'file'?)"),
    ],
)
def test_config_values_of_the_wrong_type_are_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    """Each wrong value is named with its key, the type expected and the value given; an
    unknown key with the closest valid one."""
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", str(config)], env={})
    assert message in str(info.value)


def test_config_values_of_the_right_type_are_kept(tmp_path: Path) -> None:
    """Integers are numbers; a bare warmup node name is a set of one; strings in [server] are
    parsed like env values; the typed values arrive unchanged."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[server]\nmax_wait_ms = 3\nreflection = "false"\nport = "50052"\n'
        + M
        + "allow_random = true\nmax_wait_ms = 4\nmean = [0, 0.5, 1]\n"
        + 'warmup_nodes = ["layer1", ["layer2", "layer3"]]\nkwargs = { num_classes = 10 }\n'
    )
    s = load_settings(["--config", str(config)], env={})
    assert (s.max_wait_ms, s.reflection, s.port) == (3.0, False, 50052)
    (m,) = s.models
    assert m.allow_random is True and m.max_wait_ms == 4 and m.mean == (0, 0.5, 1)
    assert m.warmup_nodes == (("layer1",), ("layer2", "layer3"))
    assert dict(m.kwargs) == {"num_classes": 10}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (["--port", "70000"], "setting 'port' must be in 0..65535, got 70000"),
        (["--metrics-port", "-1"], "setting 'metrics_port' must be in 0..65535, got -1"),
        (["--decode-threads", "0"], "setting 'decode_threads' must be >= 1, got 0"),
        (["--max-wait-ms", "-2"], "setting 'max_wait_ms' must be >= 0, got -2.0"),
        (["--gpu-decode", "yes"], "setting 'gpu_decode' must be one of ('auto', 'on', 'off')"),
        (["--log-format", "xml"], "setting 'log_format' must be one of ('json', 'text')"),
        (["--log-level", "verbose"], "setting 'log_level' must be DEBUG, INFO, WARNING"),
        (
            ["--max-connection-age-grace-s", "-1"],
            "setting 'max_connection_age_grace_s' must be >= 0, got -1.0",
        ),
        ("[server]\nshutdown_delay_s = -1\n", "setting 'shutdown_delay_s' must be >= 0, got -1"),
        ("[server]\nport = 65536\n", "setting 'port' must be in 0..65535, got 65536"),
        (M + "max_batch_size = -1\n", "model 'a': max_batch_size must be >= 0, got -1"),
        (M + "max_wait_ms = -1\n", "model 'a': max_wait_ms must be >= 0, got -1"),
        (M + 'compile = "fast"\n', "model 'a': compile must be one of ('auto', '', 'default'"),
        (M + 'autocast = "fp16"\n', "model 'a': autocast must be one of ('', 'float16'"),
    ],
)
def test_out_of_range_values_name_the_key_the_range_and_the_value(
    tmp_path: Path, source: list[str] | str, message: str
) -> None:
    """Refused at start-up, from a flag or the config file alike, with what to write instead."""
    argv = source if isinstance(source, list) else []
    if isinstance(source, str):
        config = tmp_path / "c.toml"
        config.write_text(source)
        argv = ["--config", str(config)]
    with pytest.raises(ConfigError) as info:
        load_settings(argv, env={})
    assert message in str(info.value)


def test_in_range_edges_and_any_case_log_levels_are_kept() -> None:
    s = load_settings(
        ["--port", "0", "--metrics-port", "65535", "--log-level", "debug"],
        env={"LAYERTAP_MAX_BATCH_SIZE": "0", "LAYERTAP_TORCH_THREADS": "0"},
    )
    assert (s.port, s.metrics_port, s.log_level, s.max_batch_size) == (0, 65535, "debug", 0)


def test_max_batch_size_zero_means_the_measured_default_of_the_device() -> None:
    from layertap.server.settings import default_batch_size

    assert load_settings([], env={}).max_batch_size == 0
    assert (default_batch_size("cpu"), default_batch_size("cuda")) == (4, 32)


def test_bad_env_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_settings([], env={"LAYERTAP_MAX_BATCH_SIZE": "lots"})


def test_serve_exits_2_on_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from layertap.server.app import main

    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_print_config_redacts_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from layertap.server.app import main

    assert main(["--print-config", "--auth-tokens", "s3cret,other", "--port", "6000"]) == 0
    printed = capsys.readouterr().out
    assert "s3cret" not in printed
    data = json.loads(printed)
    assert data["auth_tokens"] == "<redacted>" and data["port"] == 6000
    assert [m["name"] for m in data["models"]] == ["mobilenet_v2", "resnet50", "vgg16"]


@pytest.mark.parametrize(("word", "value"), [("true", True), ("0", False), ("off", False)])
def test_boolean_settings(word: str, value: bool) -> None:
    assert load_settings(["--reflection", word], env={}).reflection is value


def test_unclear_boolean_is_an_error() -> None:
    with pytest.raises(ConfigError, match="reflection"):
        load_settings([], env={"LAYERTAP_REFLECTION": "maybe"})


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        load_settings(["--tls-cert", str(tmp_path / "c.pem")], env={})
    with pytest.raises(ConfigError, match="not a readable file"):
        load_settings(["--tls-cert", str(tmp_path / "c.pem"), "--tls-key", "k"], env={})


def test_tokens_from_setting_and_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# operators\nfile-token\n\n")
    s = load_settings(["--auth-tokens-file", str(tokens)], env={"LAYERTAP_AUTH_TOKENS": "a, b"})
    assert s.tokens() == {"a", "b", "file-token"}
