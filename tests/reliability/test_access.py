"""Who may use what: per-token model allow-lists, the GetParameters switch, and load errors
that show clients no server paths.

- An auth_tokens entry (or a line of auth_tokens_file) may name the only models its token may
  use: `tok-a tiny other`. For such a token, every other model answers NOT_FOUND with exactly
  the message of a model that is not configured (listing only its own), and ListModels /
  GetServerInfo show only its models: a scoped token cannot even learn that the others exist.
  Before, there was no way to scope a token (and such an entry failed start-up: a token with a
  space in it).
- get_parameters = false: GetParameters answers UNIMPLEMENTED naming the setting, before any
  model lookup, and GetServerInfo stops listing it. Before, every client could read every
  weight.
- A model that fails to load: ListModels' status_message, ModelInfo.weights and the
  UNAVAILABLE message name the file by its base name only; the server log keeps the path.
  Before, clients saw the weights file's full path (the server's directory layout).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, encode, start_server

from layertap.server import security
from layertap.server.settings import ConfigError, ModelConfig, Settings
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

SIZE = 32
IMAGE = encode(np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "PNG")
ALL, SCOPED, TWO = "tok-all", "tok-scoped", "tok-two"


def tiny(name: str, **kwargs: object) -> ModelConfig:
    values: dict[str, object] = {
        "name": name,
        "factory": "factories:tiny_net",
        "kwargs": {"width": 4},
        "weights": "none",
        "allow_random": True,
        "input_size": (SIZE, SIZE),
    }
    values.update(kwargs)
    return ModelConfig(**values)  # type: ignore[arg-type]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("secret-layout") / "srv" / "weights"
    folder.mkdir(parents=True)
    (folder / "corrupt.pth").write_bytes(b"\x00 not a checkpoint " * 10)
    return folder


@pytest.fixture(scope="module")
def server(
    weights_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, list[str]]]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(
        f"# operators: every model\n{ALL}\n{TWO} tiny broken   # the batch jobs\n{SCOPED} tiny\n"
    )
    settings = Settings(
        port=0,
        log_level="ERROR",
        auth_tokens_file=str(tokens),
        models=(
            tiny("tiny"),
            tiny("secret"),
            tiny("broken", weights=str(weights_dir / "missing.pth"), allow_random=False),
            tiny("corrupt", weights=str(weights_dir / "corrupt.pth"), allow_random=False),
        ),
    )
    records = _Records()
    logging.getLogger("layertap").addHandler(records)
    running = start_server(settings)
    try:
        yield running, records.lines
    finally:
        running.stop()
        logging.getLogger("layertap").removeHandler(records)


def auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def call(server: RunningServer, method: str, request: object, token: str) -> object:
    with server.channel() as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        return getattr(stub, method)(request, metadata=auth(token), timeout=60)


def failure(server: RunningServer, method: str, request: object, token: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(server, method, request, token)
    return err.value


def extract(model: str) -> pb.ExtractRequest:
    return pb.ExtractRequest(model=model, images=[pb.Image(encoded=IMAGE)], nodes=["pools"])


# --------------------------------------------------------------------------- token scopes
def test_a_scoped_token_sees_only_its_models(server: tuple[RunningServer, list[str]]) -> None:
    running, _ = server
    listed = call(running, "ListModels", pb.ListModelsRequest(), SCOPED)
    assert [m.name for m in listed.models] == ["tiny"]  # type: ignore[attr-defined]
    listed = call(running, "ListModels", pb.ListModelsRequest(), TWO)
    assert [m.name for m in listed.models] == ["tiny", "broken"]  # type: ignore[attr-defined]
    everything = call(running, "ListModels", pb.ListModelsRequest(), ALL)
    assert [m.name for m in everything.models] == [  # type: ignore[attr-defined]
        "tiny",
        "secret",
        "broken",
        "corrupt",
    ]
    info = call(running, "GetServerInfo", pb.GetServerInfoRequest(), SCOPED)
    assert list(info.models) == ["tiny"]  # type: ignore[attr-defined]
    ok = call(running, "Extract", extract("tiny"), SCOPED)
    assert len(ok.results) == 1  # type: ignore[attr-defined]


def test_a_model_outside_the_token_reads_like_one_that_does_not_exist(
    server: tuple[RunningServer, list[str]],
) -> None:
    running, _ = server
    requests = {
        "Extract": lambda m: extract(m),
        "DescribeModel": lambda m: pb.DescribeModelRequest(model=m),
        "GetParameters": lambda m: pb.GetParametersRequest(model=m, names=["head.weight"]),
        "Compare": lambda m: pb.CompareRequest(
            model=m, a=[pb.Image(encoded=IMAGE)], b=[pb.Image(encoded=IMAGE)], nodes=["pools"]
        ),
    }
    for method, make in requests.items():
        hidden = failure(running, method, make("secret"), SCOPED)
        absent = failure(running, method, make("nothere"), SCOPED)
        assert hidden.code() == absent.code() == grpc.StatusCode.NOT_FOUND, method
        assert hidden.details() == absent.details().replace("nothere", "secret"), method
        assert hidden.details().endswith("available: tiny"), hidden.details()
        # a model that failed to load is hidden the same way (no UNAVAILABLE to tell it apart)
        assert failure(running, method, make("corrupt"), SCOPED).code() == grpc.StatusCode.NOT_FOUND
        # the unscoped token reaches it
        assert call(running, "DescribeModel", pb.DescribeModelRequest(model="secret"), ALL)


def test_a_stream_item_outside_the_token_is_that_item_s_not_found(
    server: tuple[RunningServer, list[str]],
) -> None:
    running, _ = server
    items = [
        pb.ExtractStreamRequest(id="mine", request=extract("tiny")),
        pb.ExtractStreamRequest(id="theirs", request=extract("secret")),
        pb.ExtractStreamRequest(id="mine-again", request=extract("tiny")),
    ]
    with running.channel() as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        answers = {a.id: a for a in stub.ExtractStream(iter(items), metadata=auth(SCOPED))}
    assert answers["mine"].WhichOneof("result") == "response"
    assert answers["mine-again"].WhichOneof("result") == "response"
    assert answers["theirs"].error.code_name == "NOT_FOUND"
    assert answers["theirs"].error.message.endswith("available: tiny")


def test_token_entries_are_parsed_compatibly(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nplain\n  spaced   a b  # why\n\n")
    settings = Settings(auth_tokens="x, y a, plain", auth_tokens_file=str(tokens))
    assert settings.token_models() == {
        "x": None,
        "y": frozenset({"a"}),
        "plain": None,
        "spaced": frozenset({"a", "b"}),
    }
    assert settings.tokens() == {"x", "y", "plain", "spaced"}


def test_token_entry_mistakes_stop_the_start_without_quoting_the_token(tmp_path: Path) -> None:
    models = (tiny("tiny"),)
    with pytest.raises(ConfigError, match="not configured: tinny") as err:
        security.model_access(Settings(auth_tokens="s3cr3t-value tinny", models=models))
    assert "s3cr3t" not in str(err.value)
    with pytest.raises(ConfigError, match="entry 2 repeats the token of auth_tokens entry 1"):
        Settings(auth_tokens="s3cr3t-value tiny, s3cr3t-value", models=models).token_models()
    # the same entry twice is harmless
    twice = Settings(auth_tokens="s3cr3t-value tiny, s3cr3t-value tiny", models=models)
    assert twice.token_models() == {"s3cr3t-value": frozenset({"tiny"})}


# --------------------------------------------------------------------------- load errors
def test_load_errors_show_clients_no_server_paths(
    server: tuple[RunningServer, list[str]], weights_dir: Path
) -> None:
    running, logged = server
    listed = call(running, "ListModels", pb.ListModelsRequest(), ALL)
    info = {m.name: m for m in listed.models}  # type: ignore[attr-defined]
    for name, file in (("broken", "missing.pth"), ("corrupt", "corrupt.pth")):
        shown = [info[name].status_message, info[name].weights]
        described = failure(running, "DescribeModel", pb.DescribeModelRequest(model=name), ALL)
        extracted = failure(running, "Extract", extract(name), ALL)
        assert described.code() == extracted.code() == grpc.StatusCode.UNAVAILABLE
        shown += [described.details(), extracted.details()]
        for text in shown:
            assert file in text, text  # the file is still named, by its base name
            assert str(weights_dir.parent) not in text and "/" not in text, text
    assert "does not exist" in info["broken"].status_message
    assert "cannot load" in info["corrupt"].status_message
    # the operator's log keeps the whole path
    assert any(str(weights_dir / "missing.pth") in line for line in logged), logged


# --------------------------------------------------------------------------- GetParameters
@pytest.fixture(scope="module")
def no_parameters() -> Iterator[RunningServer]:
    running = start_server(
        Settings(port=0, log_level="ERROR", get_parameters=False, models=(tiny("tiny"),))
    )
    yield running
    running.stop()


def test_get_parameters_can_be_turned_off(no_parameters: RunningServer) -> None:
    with no_parameters.channel() as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        for model in ("tiny", "nothere"):  # before any model lookup
            with pytest.raises(grpc.RpcError) as err:
                stub.GetParameters(
                    pb.GetParametersRequest(model=model, names=["head.weight"]), timeout=30
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "get_parameters = false" in str(err.value.details())
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
        assert "GetParameters" not in info.methods and "Extract" in info.methods
        assert stub.DescribeModel(pb.DescribeModelRequest(model="tiny"), timeout=30).nodes


def test_get_parameters_is_on_by_default(server: tuple[RunningServer, list[str]]) -> None:
    running, _ = server
    got = call(
        running, "GetParameters", pb.GetParametersRequest(model="tiny", names=["head.weight"]), ALL
    )
    assert [p.key for p in got.parameters] == ["head.weight"]  # type: ignore[attr-defined]
