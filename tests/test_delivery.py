import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import random
import re
import socket
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import dkim as dkimpy
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import tls
from gateway.audit import AuditLog
from gateway.config import Route
from gateway.delivery import Deliverer, DotStuffer, OutgoingMessage
from gateway.dkim import verify_message
from gateway.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from gateway.headers import decision_field
from gateway.keys import dkim_record_for, load_keys
from gateway.policy import load_policy
from gateway.queue_entry import QueueEntry, Recipient, State
from gateway.reference import new_reference
from gateway.spool import Spool
from gateway.worker import DecisionSigner, Worker
from tests.harness import make_setup
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


async def test_the_pool_keeps_up_to_max_idle_per_route(client_tls_context, receiver):
    """After a burst of three, two connections stay for the next burst; the third is closed."""
    port, handler = receiver
    deliverer = Deliverer(
        tls_context=client_tls_context,
        helo_name="gateway.test",
        connect_timeout=5,
        max_idle_per_route=2,
    )
    try:
        burst = [ALICE, BOB, ALICE]
        await asyncio.gather(
            *(deliverer.deliver(route_to(port), SENDER, [r], MESSAGE) for r in burst)
        )
        assert deliverer.connections_opened == 3
        attempts = await asyncio.gather(
            *(deliverer.deliver(route_to(port), SENDER, [r], MESSAGE) for r in (ALICE, BOB))
        )
        assert [a.response for a in attempts] == [250, 250]
        assert deliverer.connections_opened == 3
        assert deliverer.connections_reused == 2
    finally:
        await deliverer.close()
    assert len(handler.messages) == 5


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


# -- streaming ---------------------------------------------------------------------------------


def _split(data, cuts):
    """`data` cut at the given positions, with an empty piece between each two."""
    points = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    return [piece for a, b in itertools.pairwise(points) for piece in (data[a:b], b"")]


@settings(max_examples=500, deadline=None)
@given(
    message=st.lists(
        st.sampled_from([b".", b"..", b"\r\n", b"\n", b"\r", b"a", b"\r\n.\r\n", b" "])
        | st.binary(max_size=3),
        max_size=30,
    ).map(b"".join),
    cuts=st.lists(st.integers(0, 100), max_size=10),
)
def test_dot_stuffing_in_any_pieces_is_the_stuffing_of_the_whole(message, cuts):
    """Stuffing a message piece by piece, cut anywhere, gives what stuffing it whole gives."""
    stuffer = DotStuffer()
    streamed = b"".join(stuffer.feed(piece) for piece in _split(message, cuts)) + stuffer.end()
    whole = message if message.endswith(b"\r\n") else message + b"\r\n"
    assert re.sub(rb"(?m)^\.", b"..", whole) + b".\r\n" == streamed


def _streamed_content(size):
    """A plausible message of about `size` bytes whose body is hard on stuffing and DKIM."""
    lines = [
        b".",
        b"..two dots",
        b".one dot",
        b"trailing white space \t ",
        b"  runs \t\t of    white   space",
        b"",
        b"Plain text of a referral, line after line. " * 3,
    ]
    rng = random.Random(size)
    head = (
        b"Received: from agency.test ([127.0.0.1])\r\n\tby gateway.test; Wed, 25 Nov 2026\r\n"
        b"From: Duty Officer <duty.officer@bromley.gcsx.gov.uk>\r\n"
        b"To: lead@nhs.net\r\nSubject: OFFICIAL-SENSITIVE streamed\r\n\r\n"
    )
    body = []
    total = len(head)
    while total < size:
        line = rng.choice(lines) + b"\r\n"
        body.append(line)
        total += len(line)
    return head + b"".join(body) + b"\r\n\r\n\r\n"


@contextlib.asynccontextmanager
async def spool_worker(tmp_path, ca, client_tls_context, nhs_port, police_port):
    """A worker with a real spool, transfer log, policy and DKIM key, delivering to two ports.

    Mail for nhs.net goes to `nhs_port`, for pnn.police.uk to `police_port`. Yields the worker,
    its spool, the policy version and the DKIM public key.
    """
    setup = make_setup(tmp_path, ca, receiver_port=nhs_port)
    config = setup.config
    keys = load_keys(config.keys_path)
    spool = Spool(config.spool_path, keys.spool_key)
    spool.prepare(process_start=time.time())
    audit = AuditLog.from_config(config.audit, keys.signing_key)
    await audit.start()
    policy = load_policy(config.policy_path)
    routes = tuple(
        replace(r, port=police_port) if r.domain == "pnn.police.uk" else r
        for r in config.delivery.routes
    )
    worker = Worker(
        spool=spool,
        audit=audit,
        deliverer=Deliverer(
            tls_context=client_tls_context, helo_name="gateway.test", connect_timeout=5
        ),
        delivery=replace(config.delivery, routes=routes),
        policy=lambda: policy,
        clock=lambda: dt.datetime.now(dt.UTC),
        signer=DecisionSigner(keys.dkim_key, config.dkim),
    )
    try:
        yield worker, spool, policy.version, keys.dkim_key.public_key()
    finally:
        await worker.stop()
        await audit.close()


def spool_message(spool, policy_version, content, recipients):
    """Commit `content` for `recipients` to the spool as a released message; return its entry."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    writer = spool.new_message(new_reference(now, random=os.urandom(10)))
    for start in range(0, len(content), 256 * 1024):
        writer.write(content[start : start + 256 * 1024])
    entry = QueueEntry(
        ref=writer.ref,
        state=State.ACTIVE,
        received=now,
        client="test-agency",
        sender=SENDER,
        sender_domain="agency.example",
        sender_pseudonym="p:" + "a" * 32,
        recipients=tuple(
            Recipient(a, a.partition("@")[2], f"p:{n:032x}") for n, a in enumerate(recipients)
        ),
        verdict="release",
        reasons=(),
        policy=policy_version,
        decided_at=now,
        size=writer.size,
        digest=writer.digest,
    )
    spool.commit(writer, entry)
    return entry


def record_mail_options(handler):
    """Make the receiver keep each MAIL command's options (SIZE=); return the list they go to."""
    seen = []

    async def handle_mail(_server, _session, envelope, address, options):
        seen.append(options)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    handler.handle_MAIL = handle_mail
    return seen


async def test_multi_megabyte_message_streams_from_the_spool_to_two_routes(
    tmp_path, ca, client_tls_context, start
):
    """A 3 MB message goes to two servers at once, each byte-identical, signed and verifiable."""
    nhs_port, nhs = await start()
    police_port, police = await start()
    options = record_mail_options(nhs)
    content = _streamed_content(3 * 1024 * 1024)
    async with spool_worker(tmp_path, ca, client_tls_context, nhs_port, police_port) as (
        worker,
        spool,
        policy_version,
        public_key,
    ):
        entry = spool_message(
            spool, policy_version, content, ["lead@nhs.net", "x@met.pnn.police.uk"]
        )
        await worker.attempt(entry.ref)
        assert not spool.contains(entry.ref)
    [to_nhs], [to_police] = nhs.messages, police.messages
    assert to_nhs.content == to_police.content
    decision = decision_field(ref=entry.ref, policy_version=policy_version, at=entry.decided_at)
    signature = to_nhs.content[: to_nhs.content.index(decision)]
    assert signature.startswith(b"DKIM-Signature: ")
    assert signature + decision + content == to_nhs.content
    assert verify_message(to_nhs.content, public_key).valid
    record = dkim_record_for(public_key).encode("ascii")

    def lookup(name, timeout=5):
        """The published key record, whatever is asked (offline DNS)."""
        return record

    assert dkimpy.verify(to_nhs.content, dnsfunc=lookup)
    assert [[f"SIZE={len(to_nhs.content)}"]] == options


BLOCKS_BEFORE_GIVING_UP = 400  # 25 MB: under the receiver's 32 MiB limit


class _HangUpAfterFirstBlock:
    """Content of many blocks whose receiver hangs up once the first block is written."""

    def __init__(self, receiver):
        self.receiver = receiver
        self.blocks = 0
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.blocks == 1:
            await self.receiver.wait_gone()
        if self.closed or self.blocks == BLOCKS_BEFORE_GIVING_UP:
            raise StopAsyncIteration
        self.blocks += 1
        return await asyncio.to_thread(bytes, 64 * 1024)

    async def aclose(self):
        self.closed = True


async def test_connection_lost_while_the_body_streams_is_a_deferral_not_ambiguous(
    deliverer, receiver
):
    """A hang-up before the end of data is a temporary failure; the connection is not reused."""
    port, handler = receiver
    content = _HangUpAfterFirstBlock(handler)
    size = BLOCKS_BEFORE_GIVING_UP * 64 * 1024
    message = OutgoingMessage(b"", b"Subject: x\r\n", size, lambda: content)
    with pytest.raises(TemporaryDeliveryError) as info:
        await deliverer.deliver(route_to(port), SENDER, [ALICE], message)
    assert info.value.kind == "disconnected"
    assert content.closed
    assert 1 < content.blocks < BLOCKS_BEFORE_GIVING_UP
    assert handler.messages == []
    assert_no_personal_data(info.value)
    attempt = await deliverer.deliver(route_to(port), SENDER, [BOB], MESSAGE)
    assert attempt.response == 250
    assert deliverer.connections_opened == 2
    assert deliverer.connections_reused == 0


RECEIVER_PROCESS = """
import asyncio, base64, hashlib, json, sys
from pathlib import Path
from gateway import tls
from tests.receiver import start_receiver, stop_receiver

async def main():
    context = tls.server_context(Path(sys.argv[1]), Path(sys.argv[2]))
    server, port, handler = await start_receiver(tls_context=context)
    print(port, flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    got = [
        {
            "size": len(m.content),
            "sha256": hashlib.sha256(m.content).hexdigest(),
            "head": base64.b64encode(m.content[:4096]).decode(),
        }
        for m in handler.messages
    ]
    print(json.dumps(got), flush=True)
    await stop_receiver(server, handler)

asyncio.run(main())
"""


async def test_memory_of_a_delivery_does_not_grow_with_the_message(
    tmp_path, ca, client_tls_context, cert_files
):
    """Delivering a 20 MB message from the spool never holds more than a few MB at once."""
    cert, key = cert_files
    # The receiver runs in a process of its own: the copy it keeps is not ours to count.
    receiver_process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RECEIVER_PROCESS,
        str(cert),
        str(key),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[1],
    )
    try:
        port = int(await asyncio.wait_for(receiver_process.stdout.readline(), 30))
        async with spool_worker(tmp_path, ca, client_tls_context, port, port) as (
            worker,
            spool,
            policy_version,
            _,
        ):
            entry = spool_message(
                spool, policy_version, _streamed_content(20 * 1024 * 1024), ["lead@nhs.net"]
            )
            tracemalloc.start()
            try:
                await worker.attempt(entry.ref)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert not spool.contains(entry.ref)
        out, _ = await asyncio.wait_for(receiver_process.communicate(b"\n"), 60)
    finally:
        if receiver_process.returncode is None:
            receiver_process.kill()
            await receiver_process.wait()
    [got] = json.loads(out)
    head = base64.b64decode(got["head"])
    signature = head[: head.index(b"X-Safeguarding-Decision: ")]
    decision = decision_field(ref=entry.ref, policy_version=policy_version, at=entry.decided_at)
    whole = signature + decision + _streamed_content(20 * 1024 * 1024)
    expected = (len(whole), hashlib.sha256(whole).hexdigest())
    assert expected == (got["size"], got["sha256"])
    # About 2.5 MB measured (blocks, their stuffed copies, TLS buffers); one copy would be 20.
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes for a {len(whole)}-byte delivery"
