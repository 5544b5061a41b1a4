import asyncio
import datetime as dt
import socket

import pytest
import trustme

from gateway import tls
from gateway.config import Route
from gateway.delivery import Deliverer
from gateway.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from tests.receiver import start_receiver, stop_receiver

SENDER = "canary.sender@agency.example"
ALICE = "canary.alice@nhs.example"
BOB = "canary.bob@nhs.example"
MESSAGE = b"From: a@agency.example\r\nSubject: test\r\n\r\nHello.\r\n.leading dot\r\n"


def route_to(port, tls_name="localhost"):
    """Return a route for nhs.example to a receiver on `port`."""
    return Route(
        domain="nhs.example", subdomains=False, host="127.0.0.1", port=port, tls_name=tls_name
    )


@pytest.fixture
async def deliverer(client_tls_context):
    """Make a Deliverer trusting the test CA, closed after the test."""
    d = Deliverer(tls_context=client_tls_context, helo_name="gateway.test", connect_timeout=5)
    yield d
    await d.close()


@pytest.fixture
async def start(server_tls_context):
    """Start extra receivers (TLS with the localhost cert unless told); all stopped after."""
    started = []

    async def _start(**kwargs):
        kwargs.setdefault("tls_context", server_tls_context)
        server, port, handler = await start_receiver(**kwargs)
        started.append((server, handler))
        return port, handler

    yield _start
    for server, handler in started:
        await stop_receiver(server, handler)


def assert_no_personal_data(exc):
    """Check that no canary address appears in an exception or its causes."""
    text = " ".join(str(e) for e in (exc, exc.__cause__, exc.__context__) if e is not None)
    assert "canary" not in text


async def test_delivers_over_verified_tls(deliverer, receiver):
    """A message is delivered over verified TLS and the attempt says which TLS."""
    port, handler = receiver
    attempt = await deliverer.deliver(route_to(port), SENDER, [ALICE, BOB], MESSAGE)
    assert attempt.response == 250
    assert not attempt.ambiguous
    assert attempt.host == f"127.0.0.1:{port}"
    assert [(o.address, o.delivered, o.permanent) for o in attempt.outcomes] == [
        (ALICE, True, False),
        (BOB, True, False),
    ]
    assert attempt.tls is not None
    assert attempt.tls.verified
    assert attempt.tls.version in {"TLSv1.2", "TLSv1.3"}
    assert attempt.tls.cipher
    [got] = handler.messages
    assert got.mail_from == SENDER
    assert got.rcpt_tos == (ALICE, BOB)
    assert got.content == MESSAGE
    assert got.tls_version == attempt.tls.version


async def test_no_starttls_defers_and_sends_nothing(deliverer, start):
    """A server that offers no STARTTLS gets a deferral, never a clear-text message."""
    port, handler = await start(tls_context=None)
    with pytest.raises(TemporaryDeliveryError) as info:
        await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    assert info.value.kind == "no_starttls"
    assert handler.messages == []


async def test_certificate_for_another_name_defers(deliverer, receiver):
    """A certificate that does not carry the route's tls_name is a certificate deferral."""
    port, handler = receiver
    with pytest.raises(TemporaryDeliveryError) as info:
        await deliverer.deliver(route_to(port, "wrong.example"), SENDER, [ALICE], MESSAGE)
    assert info.value.kind == "certificate"
    assert handler.messages == []


async def test_untrusted_certificate_defers(deliverer, start, tmp_path):
    """A certificate from an authority we do not trust is a certificate deferral."""
    stranger = trustme.CA().issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "s-cert.pem", tmp_path / "s-key.pem"
    stranger.cert_chain_pems[0].write_to_path(cert)
    stranger.private_key_pem.write_to_path(key)
    port, handler = await start(tls_context=tls.server_context(cert, key))
    with pytest.raises(TemporaryDeliveryError) as info:
        await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    assert info.value.kind == "certificate"
    assert handler.messages == []


async def test_tls13_minimum_against_tls12_server(ca_file, server_tls_context, start):
    """Requiring TLS 1.3 from a server that stops at TLS 1.2 is a handshake deferral."""
    server_tls_context.maximum_version = tls.ssl.TLSVersion.TLSv1_2
    port, handler = await start(tls_context=server_tls_context)
    context = tls.client_context(ca_file=ca_file, min_version="1.3")
    deliverer = Deliverer(tls_context=context, helo_name="gateway.test", connect_timeout=5)
    try:
        with pytest.raises(TemporaryDeliveryError) as info:
            await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    finally:
        await deliverer.close()
    assert info.value.kind == "tls_handshake"
    assert handler.messages == []


async def test_one_recipient_refused_permanently(deliverer, start):
    """A 550 at RCPT makes that recipient permanent while the other is delivered."""
    port, handler = await start(fail_rcpt={BOB: 550})
    attempt = await deliverer.deliver(route_to(port), SENDER, [ALICE, BOB], MESSAGE)
    outcomes = {o.address: o for o in attempt.outcomes}
    assert outcomes[ALICE].delivered
    assert not outcomes[BOB].delivered
    assert outcomes[BOB].permanent
    assert outcomes[BOB].code == 550
    assert handler.messages[0].rcpt_tos == (ALICE,)


async def test_temporary_recipient_refusal_is_not_permanent(deliverer, start):
    """A 450 at RCPT for every recipient sends no DATA and marks them temporary."""
    port, handler = await start(fail_rcpt={ALICE: 450})
    attempt = await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    assert attempt.response is None
    [outcome] = attempt.outcomes
    assert (outcome.code, outcome.delivered, outcome.permanent) == (450, False, False)
    assert handler.messages == []


async def test_data_451_is_temporary(deliverer, start):
    """A 451 reply to the message is a temporary error carrying the code."""
    port, _ = await start(fail_data=451)
    with pytest.raises(TemporaryDeliveryError) as info:
        await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    assert info.value.code == 451
    assert info.value.kind == "smtp_4xx"


async def test_data_554_is_permanent(deliverer, start):
    """A 554 reply to the message is a permanent error carrying the code."""
    port, _ = await start(fail_data=554)
    with pytest.raises(PermanentDeliveryError) as info:
        await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    assert info.value.code == 554


async def test_drop_after_data_is_ambiguous(deliverer, start):
    """A hang-up after the final dot is not delivered but flagged as ambiguous."""
    port, handler = await start(drop_after_data=True)
    attempt = await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    assert attempt.ambiguous
    assert attempt.response is None
    assert [o.delivered for o in attempt.outcomes] == [False]
    assert not attempt.outcomes[0].permanent
    assert len(handler.messages) == 1


async def test_sequential_deliveries_reuse_one_connection(deliverer, receiver):
    """Two deliveries in a row to one route share one connection."""
    port, handler = receiver
    for _ in range(2):
        attempt = await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
        assert attempt.response == 250
    assert deliverer.connections_opened == 1
    assert deliverer.connections_reused == 1
    assert len(handler.messages) == 2


async def test_failed_transaction_keeps_connection_reusable(deliverer, start):
    """After a refused message the next one goes over the same connection."""
    port, handler = await start(fail_rcpt={BOB: 550})
    await deliverer.deliver(route_to(port), SENDER, [BOB], MESSAGE)
    attempt = await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    assert attempt.response == 250
    assert deliverer.connections_opened == 1
    assert len(handler.messages) == 1


async def test_dead_idle_connection_is_replaced(deliverer, receiver):
    """When the server hung up an idle connection, the next delivery opens a new one."""
    port, handler = receiver
    await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    handler.drop_connections()
    attempt = await deliverer.deliver(route_to(port), SENDER, [BOB], MESSAGE)
    assert attempt.response == 250
    assert deliverer.connections_opened == 2
    assert deliverer.connections_reused == 1
    assert [m.rcpt_tos for m in handler.messages] == [(ALICE,), (BOB,)]


async def test_concurrent_deliveries_do_not_share_a_connection(deliverer, receiver):
    """Deliveries running at once use their own connections; one is kept for later."""
    port, handler = receiver
    attempts = await asyncio.gather(
        deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE),
        deliverer.deliver(route_to(port), SENDER, [BOB], MESSAGE),
    )
    assert [a.response for a in attempts] == [250, 250]
    assert deliverer.connections_opened == 2
    await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    assert deliverer.connections_opened == 2
    assert deliverer.connections_reused == 1
    assert len(handler.messages) == 3


async def test_message_limit_per_connection(client_tls_context, receiver):
    """A connection that carried its quota of messages is not used again."""
    port, _ = receiver
    deliverer = Deliverer(
        tls_context=client_tls_context,
        helo_name="gateway.test",
        connect_timeout=5,
        max_messages_per_connection=1,
    )
    try:
        for _ in range(2):
            await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    finally:
        await deliverer.close()
    assert deliverer.connections_opened == 2
    assert deliverer.connections_reused == 0


async def test_connection_refused_defers(deliverer):
    """A closed port is a connect deferral."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TemporaryDeliveryError) as info:
        await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    assert info.value.kind == "connect"


async def test_smtputf8_used_when_needed(deliverer, receiver):
    """An internationalised address goes out with SMTPUTF8 when the server offers it."""
    port, handler = receiver
    sender = "jürgen@agency.example"
    attempt = await deliverer.deliver(route_to(port), sender, [ALICE], MESSAGE)
    assert attempt.response == 250
    assert handler.messages[0].mail_from == sender


async def test_smtputf8_needed_but_not_offered_is_permanent(deliverer, start):
    """A message that needs SMTPUTF8 bounces when the server does not offer it."""
    port, handler = await start(smtputf8=False)
    with pytest.raises(PermanentDeliveryError) as info:
        await deliverer.deliver(route_to(port), "jürgen@agency.example", [ALICE], MESSAGE)
    assert info.value.kind == "no_smtputf8"
    assert handler.messages == []


@pytest.mark.parametrize(
    "options",
    [
        {"tls_context": None},
        {"fail_data": 451},
        {"fail_data": 550},
        {"tls_name": "wrong.example"},
        {"smtputf8": False, "sender": "canary.jürgen@agency.example"},
    ],
)
async def test_errors_carry_no_addresses(deliverer, start, options):
    """Delivery errors name the host and code, never an envelope address."""
    options = dict(options)
    tls_name = options.pop("tls_name", "localhost")
    sender = options.pop("sender", SENDER)
    port, _ = await start(**options)
    with pytest.raises(DeliveryError) as info:
        await deliverer.deliver(route_to(port, tls_name), sender, [ALICE, BOB], MESSAGE)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert_no_personal_data(info.value)


async def test_close_quits_idle_connections(deliverer, receiver):
    """Closing the deliverer ends its idle connections."""
    port, handler = receiver
    await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    await deliverer.close()
    assert all(session.transport is None for session in handler.sessions)


async def test_idle_connection_expires(client_tls_context, receiver):
    """An idle connection older than idle_reuse is closed and not reused."""
    port, handler = receiver
    deliverer = Deliverer(
        tls_context=client_tls_context, helo_name="gateway.test", connect_timeout=5, idle_reuse=0
    )
    try:
        for _ in range(2):
            await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    finally:
        await deliverer.close()
    assert deliverer.connections_opened == 2
    assert deliverer.connections_reused == 0
    assert len(handler.messages) == 2


async def test_restarted_receiver_gets_a_new_connection(deliverer, server_tls_context, start):
    """After the receiver stops and starts again on its port, delivery reconnects."""
    server, port, first = await start_receiver(tls_context=server_tls_context)
    try:
        await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    finally:
        await stop_receiver(server, first)
    _, second = await start(port=port)
    attempt = await deliverer.deliver(route_to(port), SENDER, [BOB], MESSAGE)
    assert attempt.response == 250
    assert deliverer.connections_opened == 2
    assert [m.rcpt_tos for m in first.messages] == [(ALICE,)]
    assert [m.rcpt_tos for m in second.messages] == [(BOB,)]


async def test_expired_certificate_defers(deliverer, start, ca, tmp_path):
    """A downstream certificate past its end date is a certificate deferral, never a send."""
    now = dt.datetime.now(dt.UTC)
    expired = ca.issue_cert(
        "localhost",
        "127.0.0.1",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    cert, key = tmp_path / "e-cert.pem", tmp_path / "e-key.pem"
    expired.cert_chain_pems[0].write_to_path(cert)
    expired.private_key_pem.write_to_path(key)
    port, handler = await start(tls_context=tls.server_context(cert, key))
    with pytest.raises(TemporaryDeliveryError) as info:
        await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    assert info.value.kind == "certificate"
    assert handler.messages == []


async def test_downstream_offering_only_weak_ciphers_defers(deliverer, start, cert_files):
    """A TLS 1.2 server with only CBC-SHA1 ciphers fails the handshake: deferred, not sent."""
    cert, key = cert_files
    weak = tls.ssl.SSLContext(tls.ssl.PROTOCOL_TLS_SERVER)
    weak.load_cert_chain(cert, key)
    weak.maximum_version = tls.ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA")
    port, handler = await start(tls_context=weak)
    with pytest.raises(TemporaryDeliveryError) as info:
        await deliverer.deliver(route_to(port), SENDER, [ALICE], MESSAGE)
    assert info.value.kind == "tls_handshake"
    assert handler.messages == []
