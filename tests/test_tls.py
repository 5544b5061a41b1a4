import asyncio
import ssl

import pytest

from gateway import tls
from gateway.errors import ConfigError


def test_server_context_is_tls12_plus_without_compression(server_tls_context):
    """The inbound context refuses anything older than TLS 1.2 and turns compression off."""
    assert server_tls_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_tls_context.options & ssl.OP_NO_COMPRESSION
    assert server_tls_context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert server_tls_context.verify_mode == ssl.CERT_NONE


def test_server_context_offers_only_aead_ciphers_for_tls12(server_tls_context):
    """No RC4, 3DES, CBC or SHA-1 suite is enabled for TLS 1.2."""
    names = [c["name"] for c in server_tls_context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert names
    assert all("GCM" in n or "CHACHA20" in n for n in names)


def test_server_context_can_request_client_certificates(cert_files):
    """Asking for client certificates makes them optional, not required."""
    cert, key = cert_files
    context = tls.server_context(cert, key, request_client_cert=True)
    assert context.verify_mode == ssl.CERT_OPTIONAL


def test_missing_certificate_names_the_file(tmp_path, cert_files):
    """A missing certificate file is a ConfigError naming that file."""
    _, key = cert_files
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as info:
        tls.server_context(missing, key)
    assert info.value.file == missing
    assert "not found" in str(info.value)


def test_missing_key_names_the_file(tmp_path, cert_files):
    """A missing key file is a ConfigError naming that file."""
    cert, _ = cert_files
    missing = tmp_path / "nokey.pem"
    with pytest.raises(ConfigError) as info:
        tls.server_context(cert, missing)
    assert info.value.file == missing


def test_mismatched_key_is_a_config_error(ca, cert_files, tmp_path):
    """A key that does not belong to the certificate is a ConfigError naming the certificate."""
    cert, _ = cert_files
    other_key = tmp_path / "other.pem"
    ca.issue_cert("other.example").private_key_pem.write_to_path(other_key)
    with pytest.raises(ConfigError) as info:
        tls.server_context(cert, other_key)
    assert info.value.file == cert
    assert str(other_key) in str(info.value)


def test_garbage_certificate_is_a_config_error(tmp_path, cert_files):
    """A certificate file that is not PEM is a ConfigError."""
    _, key = cert_files
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        tls.server_context(junk, key)
    assert info.value.file == junk


def test_client_context_verifies_names_and_certificates(client_tls_context):
    """The outbound context requires a valid certificate for the expected name."""
    assert client_tls_context.verify_mode == ssl.CERT_REQUIRED
    assert client_tls_context.check_hostname
    assert client_tls_context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_context_minimum_tls13(ca_file):
    """min_version "1.3" sets TLS 1.3 as the floor."""
    context = tls.client_context(ca_file=ca_file, min_version="1.3")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3


def test_client_context_without_ca_file_uses_system_store():
    """Without a ca_file the context still verifies, trusting the system store."""
    context = tls.client_context(ca_file=None)
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_client_context_rejects_unknown_version(ca_file):
    """An unknown minimum version is a ConfigError."""
    with pytest.raises(ConfigError):
        tls.client_context(ca_file=ca_file, min_version="1.1")


def test_client_context_missing_ca_file_names_it(tmp_path):
    """A missing ca_file is a ConfigError naming it."""
    missing = tmp_path / "ca.pem"
    with pytest.raises(ConfigError) as info:
        tls.client_context(ca_file=missing)
    assert info.value.file == missing


def test_client_context_non_pem_ca_file(tmp_path):
    """A ca_file without certificates is a ConfigError naming it."""
    junk = tmp_path / "ca.pem"
    junk.write_text("nothing here\n")
    with pytest.raises(ConfigError) as info:
        tls.client_context(ca_file=junk)
    assert info.value.file == junk


async def test_server_and_client_contexts_complete_a_handshake(
    server_tls_context, client_tls_context
):
    """The two contexts agree on a verified TLS session over loopback."""

    async def answer(reader, writer):
        writer.write(b"hello\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_tls_context)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_tls_context, server_hostname="localhost"
    )
    line = await reader.readline()
    version = writer.get_extra_info("ssl_object").version()
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    assert line == b"hello\n"
    assert version in {"TLSv1.2", "TLSv1.3"}
