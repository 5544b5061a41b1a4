"""Shared fixtures: a trustme CA, a certificate for localhost, TLS contexts, a receiver."""

from __future__ import annotations

import logging
import shutil
import ssl

import pytest
import trustme

from gateway import tls
from tests.harness import CONTROL_DIRS
from tests.receiver import start_receiver, stop_receiver


@pytest.fixture(scope="session", autouse=True)
def _remove_control_dirs():
    """Remove the short control-socket folders the harness made."""
    yield
    for folder in CONTROL_DIRS:
        shutil.rmtree(folder, ignore_errors=True)


# aiosmtpd logs every sender and recipient at INFO.
logging.getLogger("mail.log").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """Make a throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture(scope="session")
def localhost_cert(ca: trustme.CA) -> trustme.LeafCert:
    """Issue a server certificate for localhost and 127.0.0.1 from `ca`."""
    return ca.issue_cert("localhost", "127.0.0.1")


@pytest.fixture
def cert_files(localhost_cert, tmp_path):
    """Write the localhost certificate chain and key to PEM files: (cert, key)."""
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    localhost_cert.cert_chain_pems[0].write_to_path(cert)
    for pem in localhost_cert.cert_chain_pems[1:]:
        pem.write_to_path(cert, append=True)
    localhost_cert.private_key_pem.write_to_path(key)
    return cert, key


@pytest.fixture
def ca_file(ca, tmp_path):
    """Write the CA certificate to a PEM file."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(path)
    return path


@pytest.fixture
def server_tls_context(cert_files) -> ssl.SSLContext:
    """Build our inbound server context with the localhost certificate."""
    cert, key = cert_files
    return tls.server_context(cert, key)


@pytest.fixture
def client_tls_context(ca_file) -> ssl.SSLContext:
    """Build our outbound verifying context, trusting the test CA."""
    return tls.client_context(ca_file=ca_file)


@pytest.fixture
async def receiver(server_tls_context):
    """Run a receiver offering STARTTLS with the localhost certificate: (port, Receiver)."""
    server, port, handler = await start_receiver(tls_context=server_tls_context)
    yield port, handler
    await stop_receiver(server, handler)
