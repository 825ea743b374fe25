"""Transport security and bearer-token authentication for the gRPC server.

`server_credentials` turns the tls_* settings into gRPC server credentials (TLS, or mutual
TLS with tls_client_ca), checking the PEM files up front so a wrong path or a key that does
not match its certificate is a clear ConfigError at start-up rather than a failed bind or a
handshake error on the first connection. `interceptors` returns the token check to pass to
`grpc.aio.server(interceptors=...)`; `model_access` which models each token may use (the
service filters by it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from .settings import ConfigError, Settings

log = logging.getLogger("layertap.server.security")

# Health checks (Kubernetes gRPC probes) and reflection carry no secrets; with
# auth_open_health they are reachable without a token so probes need no credentials.
OPEN_WHEN_PROBES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

MISSING_TOKEN = "missing credentials: send 'authorization: Bearer <token>'"
BAD_TOKEN = "the bearer token is not accepted"

Failure = tuple[grpc.StatusCode, str]

# --------------------------------------------------------------------------- TLS


def _read_pem(setting: str, path: str) -> bytes:
    """The file's bytes, or a ConfigError naming the setting when it is unreadable or not PEM."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {p}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{setting}: {p} is not a PEM file (no '-----BEGIN' block)")
    return data


def _check_pair(cert: str, key: str, key_pem: bytes) -> None:
    """Let OpenSSL (stdlib ssl) confirm the certificate parses and the key belongs to it."""
    if b"ENCRYPTED" in key_pem:
        raise ConfigError(f"tls_key: {key} is encrypted; gRPC needs an unencrypted PEM key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # a password is given so OpenSSL never prompts on the terminal for an encrypted key
        context.load_cert_chain(
            str(Path(cert).expanduser()), str(Path(key).expanduser()), password=b""
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"tls_cert/tls_key: {cert} and {key} are not a matching PEM certificate and "
            f"private key ({exc})"
        ) from exc


def _check_ca(path: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=str(Path(path).expanduser()))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"tls_client_ca: {path} is not a PEM bundle of CA certificates ({exc})"
        ) from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """None for plaintext; TLS from tls_cert/tls_key; mutual TLS when tls_client_ca is set.

    With mTLS the handshake itself rejects clients without a certificate signed by
    tls_client_ca (require_client_auth), before any RPC or token check runs.
    """
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise ConfigError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        return None
    if not settings.tls_cert or not settings.tls_key:
        raise ConfigError("tls_cert and tls_key go together: set both or neither")
    cert_pem = _read_pem("tls_cert", settings.tls_cert)
    key_pem = _read_pem("tls_key", settings.tls_key)
    _check_pair(settings.tls_cert, settings.tls_key, key_pem)
    client_ca: bytes | None = None
    if settings.tls_client_ca:
        client_ca = _read_pem("tls_client_ca", settings.tls_client_ca)
        _check_ca(settings.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


# --------------------------------------------------------------------------- tokens


def _digest(token: str) -> bytes:
    """Fixed-length digests make the comparison independent of the tokens' lengths too."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the one `authorization: Bearer <token>` header, or None (no header, several,
    another scheme, or an empty token)."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if len(values) != 1:
        return None
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class ModelAccess:
    """Which models each bearer token may use: auth_tokens entries may name them (Settings.
    token_models). `visible(metadata)` is None where every model is open (no auth, or the
    caller's token names no models), else the names this caller may use and see. The
    interceptor has already accepted the token when a FeatureService method runs."""

    def __init__(self, scopes: dict[str, frozenset[str] | None]) -> None:
        self._scopes = {_digest(t): models for t, models in scopes.items()}
        self.restricted = any(models is not None for models in scopes.values())

    def visible(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> frozenset[str] | None:
        if not self.restricted:
            return None
        token = bearer_token(metadata)
        if token is None:
            return frozenset()  # unreachable behind the interceptor; nothing, to be safe
        return self._scopes.get(_digest(token), frozenset())


def model_access(settings: Settings) -> ModelAccess:
    """The settings' token -> models table, each named model checked against [[models]]
    (ConfigError naming the entry's models, never the token)."""
    try:
        scopes = settings.token_models()
    except OSError as exc:
        raise ConfigError(
            f"auth_tokens_file: cannot read {settings.auth_tokens_file}: {exc.strerror or exc}"
        ) from exc
    configured = {m.name for m in settings.models}
    for models in scopes.values():
        unknown = sorted((models or frozenset()) - configured)
        if unknown:
            raise ConfigError(
                f"a bearer token is given models that are not configured: {', '.join(unknown)} "
                f"(models: {', '.join(sorted(configured)) or 'none'}); fix auth_tokens / "
                "auth_tokens_file"
            )
    return ModelAccess(scopes)


def _rejecting_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that fails every call with `code`.

    The kind must match: gRPC drives unary and streaming handlers differently, and a
    mismatched one would wait for request messages the client never sends.
    """

    async def abort(request_or_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    deserialize = handler.request_deserializer
    serialize = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(abort, request_deserializer=deserialize, response_serializer=serialize)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Require `authorization: Bearer <token>` on every RPC except the open prefixes.

    No or malformed header → UNAUTHENTICATED (the client did not try); a well-formed but
    unknown token → PERMISSION_DENIED. The token is compared in constant time against every
    accepted token (no early exit), so response timing reveals neither which token nor how
    much of one matched.
    """

    def __init__(self, tokens: Iterable[str], open_prefixes: tuple[str, ...] = ()) -> None:
        accepted = frozenset(tokens)
        if not accepted or any(not t or t != t.strip() for t in accepted):
            raise ValueError("TokenAuthInterceptor needs non-empty tokens without whitespace")
        self._digests = tuple(_digest(t) for t in sorted(accepted))
        self._open_prefixes = tuple(open_prefixes)

    def check(
        self, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """None when the metadata carries an accepted token, else the status to fail with."""
        token = bearer_token(metadata)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN
        given = _digest(token)
        accepted = False
        for digest in self._digests:
            accepted |= hmac.compare_digest(digest, given)
        return None if accepted else (grpc.StatusCode.PERMISSION_DENIED, BAD_TOKEN)

    def is_open(self, method: str) -> bool:
        return any(method.startswith(prefix) for prefix in self._open_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = getattr(handler_call_details, "method", "") or ""
        if handler is None or self.is_open(method):
            return handler  # unknown methods stay UNIMPLEMENTED
        failure = self.check(getattr(handler_call_details, "invocation_metadata", None))
        if failure is None:
            return handler
        code, message = failure
        log.info("rejected %s: %s", method, code.name)
        return _rejecting_handler(handler, code, message)


def interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors the settings ask for: the token check, or none without tokens."""
    try:
        tokens = settings.tokens()
    except OSError as exc:
        raise ConfigError(
            f"auth_tokens_file: cannot read {settings.auth_tokens_file}: {exc.strerror or exc}"
        ) from exc
    if not tokens:
        return []
    open_prefixes = OPEN_WHEN_PROBES if settings.auth_open_health else ()
    return [TokenAuthInterceptor(tokens, open_prefixes)]
