"""Client-side TLS credentials and the bearer-token header, shared by both clients and the CLI."""

from __future__ import annotations

from pathlib import Path

import grpc

PathLike = str | Path


def _read(what: str, path: PathLike) -> bytes:
    p = Path(path).expanduser()
    try:
        return p.read_bytes()
    except OSError as exc:
        # OSError keeps the CLI's "error: ..." path; the message says which file is meant
        raise OSError(exc.errno, f"cannot read TLS {what} {p}: {exc.strerror or exc}") from exc


def tls_credentials(
    ca: PathLike | None = None,
    cert: PathLike | None = None,
    key: PathLike | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files.

    ``ca``: CA bundle that signed the server's certificate (``None``: the system's trusted
    roots). ``cert`` + ``key``: this client's certificate and private key, for servers that
    require mutual TLS. Pass the result as ``credentials=`` to either client.
    """
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key: give both cert and key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read("CA bundle", ca) if ca is not None else None,
        private_key=_read("key", key) if key is not None else None,
        certificate_chain=_read("certificate", cert) if cert is not None else None,
    )


def with_token(
    metadata: tuple[tuple[str, str], ...] | None, token: str | None
) -> tuple[tuple[str, str], ...] | None:
    """``metadata`` plus ``authorization: Bearer <token>`` when a token is given.

    Sent as plain call metadata (not call credentials) so it also works on plaintext channels
    to a local server or behind a TLS-terminating proxy.
    """
    if token is None:
        return metadata
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, got {type(token).__name__}")
    if not token or token != token.strip() or not token.isprintable() or not token.isascii():
        raise ValueError("token must be non-empty printable ASCII without surrounding whitespace")
    existing = metadata or ()
    if any(k == "authorization" for k, _ in existing):
        raise ValueError("give either token= or an 'authorization' metadata entry, not both")
    return (*existing, ("authorization", f"Bearer {token}"))
