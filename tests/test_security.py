"""TLS, mutual TLS and bearer tokens against a real server, with certificates made in the test.

Every negative case checks the status a real client sees, so a server that silently falls back
to plaintext or accepts any token fails here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import RunningServer, start_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from layertap.client import AsyncFeatureClient, FeatureClient, FeatureServiceError, tls_credentials
from layertap.client.cli import main as cli_main
from layertap.server import security
from layertap.server.settings import ConfigError, ModelConfig, Settings

MODEL = ModelConfig(name="resnet18", arch="resnet18", weights="none", allow_random=True)
IMAGE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
TOKENS = ("alpha", "beta", "gamma")  # gamma comes from the tokens file


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    """A certificate for `key`, self-signed when `issuer` is None."""
    now = dt.datetime.now(dt.UTC)
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate, key: Any = None) -> Path:
    path = directory / f"{stem}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (directory / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate it signed,
    plus an unrelated CA with its own client certificate."""
    d = tmp_path_factory.mktemp("pki")
    keys = {
        n: ec.generate_private_key(ec.SECP256R1())
        for n in ("ca", "server", "client", "other_ca", "other_client")
    }
    ca = _cert("layertap test CA", keys["ca"], None, ca=True)
    other_ca = _cert("unrelated CA", keys["other_ca"], None, ca=True)
    _write(d, "ca", ca)
    _write(d, "other_ca", other_ca)
    _write(
        d,
        "server",
        _cert("127.0.0.1", keys["server"], (ca, keys["ca"]), server=True),
        keys["server"],
    )
    _write(d, "client", _cert("client", keys["client"], (ca, keys["ca"])), keys["client"])
    _write(
        d,
        "other_client",
        _cert("intruder", keys["other_client"], (other_ca, keys["other_ca"])),
        keys["other_client"],
    )
    return Pki(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca=d / "other_ca.pem",
        other_client_cert=d / "other_client.pem",
        other_client_key=d / "other_client.key",
    )


def _settings(**kwargs: Any) -> Settings:
    return Settings(port=0, metrics=False, warmup=False, models=(MODEL,), **kwargs)


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[RunningServer]:
    running = start_server(_settings(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[RunningServer]:
    running = start_server(
        _settings(
            tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)
        )
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text("# rotated 2024-05: beta retires next month\ngamma\n\n")
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["health-open", "health-closed"])
def token_server(request: pytest.FixtureRequest, tokens_file: Path) -> Iterator[RunningServer]:
    running = start_server(
        _settings(
            auth_tokens="alpha, beta",
            auth_tokens_file=str(tokens_file),
            auth_open_health=request.param,
        )
    )
    yield running
    running.stop()


def _works(client: FeatureClient) -> None:
    """The calls every test client makes: ListModels, DescribeModel, Extract, and
    extract_many (its ExtractStream runs on a second channel with the same credentials)."""
    assert [m.name for m in client.list_models()] == ["resnet18"]
    assert "fc" in [n.name for n in client.describe("resnet18").nodes]
    assert client.extract(IMAGE, model="resnet18", nodes="layer4", pool="avg")["layer4"].shape == (
        1,
        512,
    )
    ((key, result),) = client.extract_many([IMAGE], model="resnet18", nodes="layer4", pool="avg")
    assert key == "0" and result["layer4"].shape == (1, 512)


def _fails(client: FeatureClient) -> FeatureServiceError:
    with client, pytest.raises(FeatureServiceError) as info:
        client.list_models()
    return info.value


# --------------------------------------------------------------------------- TLS / mTLS


def test_tls_client_trusting_the_ca_works(tls_server: RunningServer, pki: Pki) -> None:
    with FeatureClient(tls_server.target, credentials=tls_credentials(ca=pki.ca)) as client:
        _works(client)


def test_tls_server_refuses_plaintext(tls_server: RunningServer) -> None:
    err = _fails(FeatureClient(tls_server.target, timeout=10))
    assert err.code == grpc.StatusCode.UNAVAILABLE


def test_tls_client_trusting_another_ca_fails(tls_server: RunningServer, pki: Pki) -> None:
    creds = tls_credentials(ca=pki.other_ca)
    err = _fails(FeatureClient(tls_server.target, credentials=creds, timeout=10))
    assert err.code == grpc.StatusCode.UNAVAILABLE


async def test_tls_async_client(tls_server: RunningServer, pki: Pki) -> None:
    creds = tls_credentials(ca=str(pki.ca))
    async with AsyncFeatureClient(tls_server.target, credentials=creds) as client:
        out = await client.extract(IMAGE, model="resnet18", nodes="fc")
    assert out["fc"].shape == (1, 1000)


def test_mtls_client_certificate_signed_by_the_ca_works(
    mtls_server: RunningServer, pki: Pki
) -> None:
    creds = tls_credentials(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    with FeatureClient(mtls_server.target, credentials=creds) as client:
        _works(client)


def test_mtls_without_client_certificate_fails(mtls_server: RunningServer, pki: Pki) -> None:
    creds = tls_credentials(ca=pki.ca)
    err = _fails(FeatureClient(mtls_server.target, credentials=creds, timeout=10))
    assert err.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_certificate_from_another_ca_fails(mtls_server: RunningServer, pki: Pki) -> None:
    creds = tls_credentials(ca=pki.ca, cert=pki.other_client_cert, key=pki.other_client_key)
    err = _fails(FeatureClient(mtls_server.target, credentials=creds, timeout=10))
    assert err.code == grpc.StatusCode.UNAVAILABLE


def test_cli_tls_options(
    mtls_server: RunningServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--target", mtls_server.target, "--timeout", "10", "--tls-ca", str(pki.ca)]
    client_cert = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert cli_main([*base, *client_cert, "models"]) == 0
    assert "resnet18" in capsys.readouterr().out
    assert cli_main([*base, "models"]) == 1  # no client certificate: the handshake fails
    assert "TLS" in capsys.readouterr().err
    assert cli_main([*base, "--tls-cert", str(pki.client_cert), "models"]) == 2  # no key
    assert "key" in capsys.readouterr().err


# --------------------------------------------------------------------------- tokens


def _token_error(server: RunningServer, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    err = _fails(FeatureClient(server.target, metadata=metadata, timeout=10))
    assert err.code is not None
    return err.code


def test_token_missing_wrong_or_malformed(token_server: RunningServer) -> None:
    err = _fails(FeatureClient(token_server.target))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in err.details
    wrong = _fails(FeatureClient(token_server.target, token="wrong"))
    assert wrong.code == grpc.StatusCode.PERMISSION_DENIED
    assert "wrong" not in wrong.details
    for value in ("Token alpha", "Bearer", "Bearer ", "alpha", "Basic YWxwaGE="):
        code = _token_error(token_server, (("authorization", value),))
        assert code == grpc.StatusCode.UNAUTHENTICATED, value
    # the comment line of the tokens file is not a token
    code = _token_error(token_server, (("authorization", "Bearer # rotated"),))
    assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("token", TOKENS)
def test_each_accepted_token_works(token_server: RunningServer, token: str) -> None:
    with FeatureClient(token_server.target, token=token) as client:
        _works(client)


def test_token_via_metadata_and_lowercase_scheme(token_server: RunningServer) -> None:
    metadata = (("x-request-id", "1"), ("authorization", "bearer beta"))
    with FeatureClient(token_server.target, metadata=metadata) as client:
        assert client.list_models()


async def test_async_client_token(token_server: RunningServer) -> None:
    async with AsyncFeatureClient(token_server.target, token="gamma") as client:
        assert (await client.describe("resnet18")).nodes
    async with AsyncFeatureClient(token_server.target, token="nope") as client:
        with pytest.raises(FeatureServiceError) as info:
            await client.list_models()
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_health_open_only_when_configured(token_server: RunningServer) -> None:
    request = health_pb2.HealthCheckRequest(service="")
    with grpc.insecure_channel(token_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # with a token the health check always works
        auth = (("authorization", "Bearer alpha"),)
        assert stub.Check(request, metadata=auth, timeout=10).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        if token_server.server.settings.auth_open_health:
            assert stub.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        else:
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_token(
    token_server: RunningServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LAYERTAP_TOKEN", raising=False)
    target = ["--target", token_server.target]
    assert cli_main([*target, "--token", "alpha", "models"]) == 0
    assert "resnet18" in capsys.readouterr().out
    assert cli_main([*target, "models", "--token", "beta"]) == 0  # after the subcommand too
    capsys.readouterr()
    assert cli_main([*target, "models"]) == 1
    assert "--token" in capsys.readouterr().err
    monkeypatch.setenv("LAYERTAP_TOKEN", "gamma")
    assert cli_main([*target, "nodes", "resnet18"]) == 0
    assert "layer4" in capsys.readouterr().out
    assert cli_main([*target, "--token", "wrong", "models"]) == 1  # the flag wins over the env
    assert "PERMISSION_DENIED" in capsys.readouterr().err


def test_plaintext_server_without_tokens_needs_nothing() -> None:
    assert security.interceptors(Settings()) == []
    assert security.server_credentials(Settings()) is None


# --------------------------------------------------------------------------- unit tests


@dataclass
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class _Aborted(Exception):
    pass


class _Context:
    """Records what the rejecting handler aborts with."""

    code: grpc.StatusCode | None = None
    details: str = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted


def _intercept(interceptor: security.TokenAuthInterceptor, details: _Details, handler: Any) -> Any:
    async def continuation(_: Any) -> Any:
        return handler

    return asyncio.run(interceptor.intercept_service(continuation, details))  # type: ignore[arg-type]


def _rejection(handler: Any) -> tuple[grpc.StatusCode | None, str]:
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(behavior(None, context))
    return context.code, context.details


KINDS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


@pytest.mark.parametrize("kind", KINDS)
def test_interceptor_rejects_with_a_handler_of_the_same_kind(kind: str) -> None:
    async def behavior(request: Any, context: Any) -> None:
        raise AssertionError("must not run without a token")

    handler = KINDS[kind](behavior, request_deserializer=bytes, response_serializer=bytes)
    interceptor = security.TokenAuthInterceptor(frozenset({"alpha"}))
    method = "/layertap.v1.FeatureService/Extract"
    replaced = _intercept(interceptor, _Details(method), handler)
    assert replaced is not handler
    assert getattr(replaced, kind) is not None
    assert (replaced.request_streaming, replaced.response_streaming) == (
        handler.request_streaming,
        handler.response_streaming,
    )
    assert replaced.request_deserializer is bytes and replaced.response_serializer is bytes
    assert _rejection(replaced) == (grpc.StatusCode.UNAUTHENTICATED, security.MISSING_TOKEN)
    ok = _Details(method, (("authorization", "Bearer alpha"),))
    assert _intercept(interceptor, ok, handler) is handler


def test_interceptor_open_prefixes_and_unknown_methods() -> None:
    handler = grpc.unary_unary_rpc_method_handler(lambda r, c: r)
    interceptor = security.TokenAuthInterceptor({"alpha"}, security.OPEN_WHEN_PROBES)
    for method in (
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/Info",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        assert _intercept(interceptor, _Details(method), handler) is handler
    closed = _intercept(interceptor, _Details("/layertap.v1.FeatureService/ListModels"), handler)
    assert closed is not handler
    # a prefix must match from the start: no bypass by embedding it later in the name
    sneaky = _intercept(interceptor, _Details("/x.Y/grpc.health.v1.Health/"), handler)
    assert sneaky is not handler
    assert _intercept(interceptor, _Details("/nope.Nope/Nothing"), None) is None


def test_interceptor_check() -> None:
    interceptor = security.TokenAuthInterceptor({"alpha", "a-much-longer-second-token"})
    assert interceptor.check([("authorization", "Bearer alpha")]) is None
    assert interceptor.check([("authorization", "  BEARER   a-much-longer-second-token ")]) is None
    denied = (grpc.StatusCode.PERMISSION_DENIED, security.BAD_TOKEN)
    for token in ("alph", "alphaa", "ALPHA", "a-much-longer-second-toke"):
        assert interceptor.check([("authorization", f"Bearer {token}")]) == denied
    missing = (grpc.StatusCode.UNAUTHENTICATED, security.MISSING_TOKEN)
    for metadata in (
        None,
        [],
        [("x-token", "alpha")],
        [("authorization", "alpha")],
        [("authorization", "Bearer alpha"), ("authorization", "Bearer alpha")],
    ):
        assert interceptor.check(metadata) == missing
    with pytest.raises(ValueError):
        security.TokenAuthInterceptor(frozenset())
    with pytest.raises(ValueError):
        security.TokenAuthInterceptor({" padded "})


def test_interceptors_follow_settings(tokens_file: Path, tmp_path: Path) -> None:
    (open_,) = security.interceptors(Settings(auth_tokens="alpha"))
    assert isinstance(open_, security.TokenAuthInterceptor)
    assert open_.is_open("/grpc.health.v1.Health/Check")
    (closed,) = security.interceptors(
        Settings(auth_tokens_file=str(tokens_file), auth_open_health=False)
    )
    assert isinstance(closed, security.TokenAuthInterceptor)
    assert not closed.is_open("/grpc.health.v1.Health/Check")
    assert closed.check([("authorization", "Bearer gamma")]) is None
    with pytest.raises(ConfigError, match="auth_tokens_file"):
        security.interceptors(Settings(auth_tokens_file=str(tmp_path)))  # a directory


def test_server_credentials_tls_and_mtls(pki: Pki) -> None:
    tls = Settings(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    assert isinstance(security.server_credentials(tls), grpc.ServerCredentials)
    mtls = Settings(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)
    )
    assert isinstance(security.server_credentials(mtls), grpc.ServerCredentials)


def test_server_credentials_errors(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    truncated = tmp_path / "truncated.pem"
    truncated.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    cert, key = str(pki.server_cert), str(pki.server_key)
    cases = {
        "not a PEM file": Settings(tls_cert=str(garbage), tls_key=key),
        "tls_key": Settings(tls_cert=cert, tls_key=str(garbage)),
        "not a matching": Settings(tls_cert=cert, tls_key=str(pki.client_key)),  # other key
        "not a matching PEM": Settings(tls_cert=str(truncated), tls_key=key),
        "tls_client_ca": Settings(tls_cert=cert, tls_key=key, tls_client_ca=str(garbage)),
        "CA certificates": Settings(tls_cert=cert, tls_key=key, tls_client_ca=str(truncated)),
        "cannot read": Settings(tls_cert=str(tmp_path / "missing.pem"), tls_key=key),
        "go together": Settings(tls_cert=cert),
        "needs tls_cert": Settings(tls_client_ca=str(pki.ca)),
    }
    for message, settings in cases.items():
        with pytest.raises(ConfigError, match=message):
            security.server_credentials(settings)


def test_client_options_validation(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both"):
        tls_credentials(ca=pki.ca, cert=pki.client_cert)
    with pytest.raises(OSError, match=r"missing\.pem"):
        tls_credentials(ca=tmp_path / "missing.pem")
    for bad in ("", " padded", "two\nlines"):
        with pytest.raises(ValueError, match="token"):
            FeatureClient("127.0.0.1:1", token=bad)
    with pytest.raises(ValueError, match="not both"):
        FeatureClient("127.0.0.1:1", token="alpha", metadata=[("authorization", "Bearer beta")])
    client = FeatureClient("127.0.0.1:1", token="secret-value")
    assert "secret-value" not in repr(client)
    client.close()


def test_cli_plaintext_against_tls_server_hints_at_tls(
    tls_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["--target", tls_server.target, "--timeout", "10", "models"]) == 1
    assert "--tls-ca" in capsys.readouterr().err
