"""Strong client identity: SMTP AUTH, client certificates, implicit TLS, session limits."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import smtplib
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import replies
from gateway.passwords import hash_password
from tests.harness import make_setup, running_gateway
from tests.test_smtp_in import SENDER, RawClient

PASSWORD = "correct horse battery staple"  # noqa: S105  (a test fixture, made up)


def plain(user: str, password: str) -> str:
    """The AUTH PLAIN initial response for `user`/`password`."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture
async def auth_gateway(tmp_path, ca, receiver):
    """A running gateway whose client must authenticate as `agency`."""
    port, handler = receiver
    hashed = hash_password(PASSWORD, n=2**14)
    setup = make_setup(
        tmp_path,
        ca,
        receiver_port=port,
        client_extra=f'auth_username = "agency"\nauth_password_hash = "{hashed}"',
        server_extra='listen_tls = ["127.0.0.1:0"]',
    )
    async with running_gateway(setup) as (daemon, smtp_port):
        yield setup, daemon, smtp_port, handler


async def tls_client(setup, port) -> RawClient:
    """A raw client after greeting, EHLO and STARTTLS."""
    raw = await RawClient.connect(port)
    await raw.reply()
    await raw.starttls(setup.client_context)
    return raw


async def test_auth_before_tls_is_refused(auth_gateway):
    """AUTH in clear text gets 530 5.7.0 and is never evaluated."""
    _setup, _daemon, port, _ = auth_gateway
    raw = await RawClient.connect(port)
    await raw.reply()
    await raw.command("EHLO agency.test")
    assert await raw.command(f"AUTH PLAIN {plain('agency', PASSWORD)}") == replies.TLS_REQUIRED
    await raw.close()


async def test_client_that_must_authenticate_gets_530_at_mail(auth_gateway):
    """A client configured with auth_username cannot send MAIL before AUTH."""
    setup, _daemon, port, _ = auth_gateway
    raw = await tls_client(setup, port)
    assert await raw.command(f"MAIL FROM:<{SENDER}>") == replies.AUTH_REQUIRED
    await raw.close()


async def test_wrong_user_and_wrong_password_get_the_same_535(auth_gateway):
    """A wrong password and an unknown user are indistinguishable: 535 5.7.8 both."""
    setup, _daemon, port, _ = auth_gateway
    raw = await tls_client(setup, port)
    assert await raw.command(f"AUTH PLAIN {plain('agency', 'wrong')}") == replies.AUTH_FAILED
    assert await raw.command(f"AUTH PLAIN {plain('nobody', PASSWORD)}") == replies.AUTH_FAILED
    assert await raw.command(f"MAIL FROM:<{SENDER}>") == replies.AUTH_REQUIRED
    await raw.close()


async def test_auth_plain_then_mail_is_accepted(auth_gateway):
    """The right credentials after STARTTLS: 235, then MAIL is accepted."""
    setup, _daemon, port, _ = auth_gateway
    raw = await tls_client(setup, port)
    assert (await raw.command(f"AUTH PLAIN {plain('agency', PASSWORD)}")).startswith("235 2.7.0")
    assert await raw.command(f"MAIL FROM:<{SENDER}>") == replies.SENDER_OK
    await raw.close()


async def test_auth_login_with_smtplib_sends_a_message(auth_gateway):
    """AUTH LOGIN from smtplib over STARTTLS relays a message end to end."""
    setup, _daemon, port, handler = auth_gateway

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="agency.test") as client:
            client.starttls(context=setup.client_context)
            client.ehlo()
            assert "LOGIN" in client.esmtp_features["auth"]
            client.login("agency", PASSWORD, initial_response_ok=False)
            return client.sendmail(SENDER, ["lead@nhs.net"], b"Subject: hi\r\n\r\nbody\r\n")

    assert await asyncio.to_thread(send) == {}
    async with asyncio.timeout(10):
        while not handler.messages:
            await asyncio.sleep(0.01)


async def test_implicit_tls_listener_offers_auth_and_relays(auth_gateway):
    """On the implicit-TLS listener AUTH is advertised at once (aiosmtpd #281) and works."""
    setup, daemon, _port, _ = auth_gateway
    tls_port = daemon.servers[1].sockets[0].getsockname()[1]

    def send() -> tuple[str, dict[str, tuple[int, bytes]]]:
        with smtplib.SMTP_SSL(
            "127.0.0.1", tls_port, local_hostname="agency.test", context=setup.client_context
        ) as client:
            client.ehlo()
            mechanisms = client.esmtp_features.get("auth", "")
            assert "starttls" not in client.esmtp_features
            client.login("agency", PASSWORD)
            return mechanisms, client.sendmail(SENDER, ["lead@nhs.net"], b"\r\nbody\r\n")

    mechanisms, refused = await asyncio.to_thread(send)
    assert set(mechanisms.split()) == {"LOGIN", "PLAIN"}
    assert refused == {}


async def test_too_many_errors_close_the_session(auth_gateway):
    """After hard_error_limit error replies the gateway says 421 and hangs up."""
    setup, _daemon, port, _ = auth_gateway
    raw = await tls_client(setup, port)
    for _ in range(20):
        assert await raw.command(f"MAIL FROM:<{SENDER}>") == replies.AUTH_REQUIRED
    assert await raw.reply() == replies.TOO_MANY_ERRORS
    assert await raw.reader.read() == b""
    await raw.close()


async def test_commands_pipelined_with_starttls_are_discarded(auth_gateway):
    """A command sent in the same packet as STARTTLS is never run after the handshake."""
    setup, _daemon, port, _ = auth_gateway
    raw = await RawClient.connect(port)
    await raw.reply()
    await raw.command("EHLO agency.test")
    await raw.send_raw(b"STARTTLS\r\nAUTH PLAIN " + plain("agency", PASSWORD).encode() + b"\r\n")
    assert (await raw.reply()).startswith("220")
    await raw.writer.start_tls(setup.client_context, server_hostname="localhost")
    await raw.command("EHLO agency.test")
    # Had the injected AUTH run, MAIL would now be accepted.
    assert await raw.command(f"MAIL FROM:<{SENDER}>") == replies.AUTH_REQUIRED
    await raw.close()


async def test_connections_per_address_are_capped(tmp_path, ca, receiver):
    """Past max_connections_per_address, a new connection from that address gets 421."""
    port, _ = receiver
    setup = make_setup(
        tmp_path, ca, receiver_port=port, server_extra="max_connections_per_address = 2"
    )
    async with running_gateway(setup) as (_daemon, smtp_port):
        first = await RawClient.connect(smtp_port)
        second = await RawClient.connect(smtp_port)
        assert (await first.reply()).startswith("220")
        assert (await second.reply()).startswith("220")
        third = await RawClient.connect(smtp_port)
        assert await third.reply() == replies.TOO_MANY_CONNECTIONS
        other = await RawClient.connect(smtp_port, local_addr=("127.0.0.2", 0))
        assert (await other.reply()).startswith("220")
        for client in (first, second, third, other):
            await client.close()


async def test_trickling_data_is_cut_off_with_421(tmp_path, ca, receiver):
    """DATA slower than min_data_rate (after the idle grace) is cut with 421 4.4.2."""
    port, _ = receiver
    setup = make_setup(
        tmp_path, ca, receiver_port=port, server_extra="idle_timeout = 1\nmin_data_rate = 2000"
    )
    async with running_gateway(setup) as (daemon, smtp_port):
        raw = await RawClient.connect(smtp_port)
        await raw.reply()
        await raw.starttls(setup.client_context)
        await raw.command(f"MAIL FROM:<{SENDER}>")
        await raw.command("RCPT TO:<lead@nhs.net>")
        assert (await raw.command("DATA")).startswith("354")
        reply = ""
        async with asyncio.timeout(15):
            while not reply:
                await raw.send_raw(b"x\r\n")
                try:
                    reply = await asyncio.wait_for(raw.reader.readline(), 0.2)
                except TimeoutError:
                    continue
        assert reply.decode().rstrip() == replies.TOO_SLOW
        await raw.close()
        assert list((daemon.config.spool_path / "tmp").iterdir()) == []


@pytest.fixture
def client_cert(ca, tmp_path):
    """A client certificate from the test CA, its files, and its sha256 fingerprint."""
    leaf = ca.issue_cert("agency.test")
    chain = tmp_path / "client.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(chain))
    der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)
    return chain, "sha256:" + hashlib.sha256(der).hexdigest()


async def test_pinned_client_certificate_is_required(tmp_path, ca, receiver, client_cert):
    """A client pinned to a certificate gets 530 without it, 250 with it."""
    port, _ = receiver
    chain, fingerprint = client_cert
    setup = make_setup(
        tmp_path / "gw",
        ca,
        receiver_port=port,
        client_extra=f'tls_client_fingerprint = "{fingerprint}"',
        server_extra='client_ca_file = "tls/ca.pem"',
    )
    with_cert = ssl.create_default_context(cafile=str(setup.ca_pem))
    with_cert.load_cert_chain(str(chain))
    other_leaf = ca.issue_cert("other.test")
    other_chain = tmp_path / "other.pem"
    other_leaf.private_key_and_cert_chain_pem.write_to_path(str(other_chain))
    with_other = ssl.create_default_context(cafile=str(setup.ca_pem))
    with_other.load_cert_chain(str(other_chain))
    async with running_gateway(setup) as (_daemon, smtp_port):
        for context, expected in (
            (setup.client_context, replies.AUTH_REQUIRED),
            (with_other, replies.AUTH_REQUIRED),
            (with_cert, replies.SENDER_OK),
        ):
            raw = await tls_client_with(context, smtp_port)
            assert await raw.command(f"MAIL FROM:<{SENDER}>") == expected
            await raw.close()


async def tls_client_with(context: ssl.SSLContext, port: int) -> RawClient:
    """A raw client after STARTTLS with the given (client-certificate) context."""
    raw = await RawClient.connect(port)
    await raw.reply()
    await raw.starttls(context)
    return raw


async def test_idle_client_gets_421_then_the_close(tmp_path, ca, receiver):
    """A client silent for idle_timeout is told 421 4.4.2 before the connection closes."""
    port, _ = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port, server_extra="idle_timeout = 1")
    async with running_gateway(setup) as (_daemon, smtp_port):
        raw = await RawClient.connect(smtp_port)
        await raw.reply()
        assert await raw.reply() == replies.TIMEOUT
        assert await raw.reader.read() == b""
        await raw.close()


async def test_data_past_the_overall_time_limit_is_cut_off(tmp_path, ca, receiver):
    """Even at a good rate, DATA longer than max_data_time is cut with 421 4.4.2."""
    port, _ = receiver
    setup = make_setup(
        tmp_path,
        ca,
        receiver_port=port,
        server_extra="idle_timeout = 5\nmin_data_rate = 1\nmax_data_time = 1",
    )
    async with running_gateway(setup) as (_daemon, smtp_port):
        raw = await RawClient.connect(smtp_port)
        await raw.reply()
        await raw.starttls(setup.client_context)
        await raw.command(f"MAIL FROM:<{SENDER}>")
        await raw.command("RCPT TO:<lead@nhs.net>")
        assert (await raw.command("DATA")).startswith("354")
        reply = b""
        async with asyncio.timeout(15):
            while not reply:
                await raw.send_raw(b"y" * 500 + b"\r\n")
                try:
                    reply = await asyncio.wait_for(raw.reader.readline(), 0.1)
                except TimeoutError:
                    continue
        assert reply.decode().rstrip() == replies.TOO_SLOW
        await raw.close()
