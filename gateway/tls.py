"""TLS contexts: one for the SMTP listener, one for verified delivery downstream.

Both allow TLS 1.2 and later only, with forward-secret AEAD ciphers for TLS 1.2 (TLS 1.3 suites
are all acceptable and are not affected by `set_ciphers`), and no TLS compression. Files that are
missing, unreadable or do not match are a `ConfigError` naming the file.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from gateway.errors import ConfigError

# ECDHE key exchange with AES-GCM or ChaCha20-Poly1305: no RC4, 3DES, CBC or SHA-1 MACs.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _check_readable(path: Path, what: str) -> None:
    """Raise ConfigError naming `path` unless it is a readable file."""
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found", file=path) from None
    except IsADirectoryError:
        raise ConfigError(f"{what} is a folder, not a file", file=path) from None
    except OSError as exc:
        raise ConfigError(f"{what} file is unreadable: {exc.strerror}", file=path) from exc


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_ciphers(TLS12_CIPHERS)


def server_context(
    cert: Path,
    key: Path,
    *,
    request_client_cert: bool = False,
    client_ca_file: Path | None = None,
) -> ssl.SSLContext:
    """Build the inbound (server side) context from a PEM certificate chain and key.

    With `request_client_cert`, clients are asked for a certificate (optional at the TLS
    level); one that is presented must chain to the system store or `client_ca_file`. Which
    client must present which certificate is checked after the handshake, by fingerprint.
    """
    _check_readable(cert, "TLS certificate")
    _check_readable(key, "TLS key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except ssl.SSLError as exc:
        problem = f"cannot load certificate with key {key}: {exc.reason or exc}"
        raise ConfigError(problem, file=cert) from exc
    context.check_hostname = False
    context.verify_mode = ssl.CERT_OPTIONAL if request_client_cert else ssl.CERT_NONE
    if request_client_cert:
        context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        if client_ca_file is not None:
            _check_readable(client_ca_file, "client CA")
            try:
                context.load_verify_locations(cafile=client_ca_file)
            except ssl.SSLError as exc:
                problem = f"no PEM certificates found: {exc.reason or exc}"
                raise ConfigError(problem, file=client_ca_file) from exc
    return context


def client_context(*, ca_file: Path | None, min_version: str = "1.2") -> ssl.SSLContext:
    """Build the outbound context: system trust store plus `ca_file`, names checked."""
    if min_version not in MIN_VERSIONS:
        choices = ", ".join(MIN_VERSIONS)
        raise ConfigError(f'min_tls_version "{min_version}" is not one of {choices}')
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        _check_readable(ca_file, "CA")
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"no PEM certificates found: {exc.reason or exc}", file=ca_file
            ) from exc
    _harden(context)
    context.minimum_version = MIN_VERSIONS[min_version]
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context
