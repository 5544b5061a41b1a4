"""Development set-up for `make run`: keys and a local certificate authority, made once.

Creates, next to the config file's paths, what a fresh machine lacks: the key folder (via the
same code as `gateway keys init`), and a development CA with one certificate for `localhost` and
127.0.0.1, used by both the gateway's listener and the local test receiver (`gateway.devsink`).
The gateway trusts the CA through `[delivery] ca_file`. Nothing here is for production.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import config as config_module
from gateway.errors import GatewayError
from gateway.keys import KEY_FILES, init_keys


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_dev_pki(cert: Path, key: Path, ca: Path) -> None:
    """A development CA and a localhost certificate signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("gateway development CA"))
        .issuer_name(_name("gateway development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    _write_private(
        key,
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def setup(config: config_module.Config) -> list[str]:
    """Create whatever is missing; return what was made."""
    made = []
    for folder in (config.spool_path, config.audit_path):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not all((config.keys_path / name).exists() for name in KEY_FILES):
        init_keys(config.keys_path)
        made.append(f"keys in {config.keys_path}")
    ca = config.delivery.ca_file
    if not config.server.tls_cert.exists() and ca is not None:
        make_dev_pki(config.server.tls_cert, config.server.tls_key, ca)
        made.append(f"development CA {ca} and certificate {config.server.tls_cert}")
    return made


def main(argv: list[str] | None = None) -> int:
    """`python -m gateway.devsetup --config config/gateway.toml`."""
    parser = argparse.ArgumentParser(prog="gateway.devsetup")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    try:
        config = config_module.load_or_explain(Path(args.config))
        for line in setup(config):
            sys.stdout.write(f"made {line}\n")
    except GatewayError as exc:
        sys.stderr.write(f"gateway.devsetup: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
