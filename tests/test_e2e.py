"""End to end: a real client sends through a running gateway to a real TLS receiver."""

from __future__ import annotations

import asyncio
import re
import smtplib

import pytest

from gateway import replies
from gateway.audit import read_records
from gateway.dkim import verify_message
from gateway.keys import DKIM_PUBLIC_KEY_FILE, load_public_key
from gateway.spool import State
from tests.harness import eventually, make_setup, running_gateway, smtp_send, without_dkim
from tests.receiver import start_receiver, stop_receiver

SENDER = "duty.officer@bromley.gcsx.gov.uk"
BODY = b"Referral details follow.\r\n.leading dot line\r\nEnd.\r\n"
REF = re.compile(r"SG-[0-9A-HJKMNP-TV-Z]{26}")


def message(subject: str = "OFFICIAL-SENSITIVE [PERSONAL] referral", extra: bytes = b"") -> bytes:
    """A small message with the given subject and extra header lines."""
    head = f"From: Duty Officer <{SENDER}>\r\nTo: lead@nhs.net\r\nSubject: {subject}\r\n".encode()
    return head + extra + b"\r\n" + BODY


def header_section(content: bytes) -> bytes:
    """The header section of a delivered message."""
    return content.split(b"\r\n\r\n", 1)[0]


async def test_released_message_arrives_with_one_decision_header(tmp_path, ca, receiver):
    """A secure recipient gets the message once, with one decision header naming the 250's ref."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    forged = b"X-Safeguarding-Decision: SG-FORGED; verdict=released\r\nTLS-Required: No\r\n"
    async with running_gateway(setup) as (daemon, smtp_port):
        seen = await asyncio.to_thread(
            smtp_send,
            smtp_port,
            setup.client_context,
            SENDER,
            ["lead@nhs.net"],
            message(extra=forged),
        )
        assert seen.code("data") == 250
        ref = REF.search(seen.text("data"))
        assert ref is not None
        assert "queued as" in seen.text("data")
        await eventually(lambda: len(handler.messages) == 1)
        await eventually(lambda: not daemon.spool.refs(State.ACTIVE))
    got = handler.messages[0]
    assert got.rcpt_tos == ("lead@nhs.net",)
    assert got.tls_version in ("TLSv1.2", "TLSv1.3")
    head = header_section(got.content)
    decision = [
        line for line in head.split(b"\r\n") if line.lower().startswith(b"x-safeguarding-decision:")
    ]
    assert len(decision) == 1
    assert without_dkim(head).startswith(
        b"X-Safeguarding-Decision: " + ref.group().encode() + b"; verdict=released; policy="
    )
    # The DKIM signature proves the decision and the body, with the public key alone.
    public = load_public_key(setup.root / "keys" / DKIM_PUBLIC_KEY_FILE)
    proof = verify_message(got.content, public)
    assert (proof.valid, proof.decision["ref"]) == (True, ref.group())
    tampered = got.content.replace(b"Referral details", b"Referral detai1s")
    assert verify_message(tampered, public).valid is False
    assert b"TLS-Required" not in head
    assert b"SG-FORGED" not in got.content
    assert b"\r\nReceived: from agency.test ([127.0.0.1])" in head
    assert got.content.endswith(b"\r\n\r\n" + BODY.replace(b"\r\n.leading", b"\r\n.leading"))
    records = list(read_records(setup.config.audit_path))
    events = [(r["event"], r.get("ref")) for r in records]
    assert ("accepted", ref.group()) in events
    assert ("delivered", ref.group()) in events
    accepted = next(r for r in records if r["event"] == "accepted")
    assert accepted["verdict"] == "release"
    assert accepted["marking"] == "OFFICIAL-SENSITIVE [PERSONAL]"
    assert accepted["recipients"][0]["domain"] == "nhs.net"
    assert accepted["recipients"][0]["secure"] is True


async def test_mixed_envelope_is_held_and_nobody_receives_it(tmp_path, ca, receiver):
    """One insecure recipient holds the whole message; the sender alone gets a notice."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    async with running_gateway(setup) as (daemon, smtp_port):
        seen = await asyncio.to_thread(
            smtp_send,
            smtp_port,
            setup.client_context,
            SENDER,
            ["lead@nhs.net", "someone@gmail.com"],
            message(),
        )
        assert seen.code("data") == 250
        assert "held as SG-" in seen.text("data")
        assert "(insecure_domain: gmail.com)" in seen.text("data")
        held_ref = REF.search(seen.text("data")).group()
        # A later secure message is delivered, so the worker has run past the held one.
        later = await asyncio.to_thread(
            smtp_send, smtp_port, setup.client_context, SENDER, ["x@met.pnn.police.uk"], message()
        )
        assert later.code("data") == 250
        await eventually(lambda: len(handler.messages) == 2)
        assert daemon.spool.refs(State.HELD) == [held_ref]
    messages = {m.rcpt_tos: m for m in handler.messages}
    assert set(messages) == {("x@met.pnn.police.uk",), (SENDER,)}
    notice = messages[(SENDER,)]
    assert notice.mail_from == "<>"
    assert b"multipart/report; report-type=delivery-status" in notice.content
    assert held_ref.encode() in notice.content
    assert b"gmail.com" in notice.content
    assert b"someone" not in notice.content
    assert b"lead" not in notice.content
    assert b"Referral details" not in notice.content
    accepted = [r for r in read_records(setup.config.audit_path) if r.get("ref") == held_ref]
    assert [r["event"] for r in accepted] == ["accepted"]
    assert accepted[0]["verdict"] == "hold"
    assert accepted[0]["reasons"] == ["insecure_domain:gmail.com"]


async def test_reject_policy_refuses_insecure_recipient_at_rcpt(tmp_path, ca, receiver):
    """With on_insecure = "reject" an insecure RCPT gets 550 5.7.1 and a `refused` record."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port, on_insecure="reject")
    async with running_gateway(setup) as (_daemon, smtp_port):
        seen = await asyncio.to_thread(
            smtp_send,
            smtp_port,
            setup.client_context,
            SENDER,
            ["someone@evilnhs.net", "lead@nhs.net"],
            message(),
        )
        assert seen.code("rcpt0") == 550
        assert seen.text("rcpt0").startswith("5.7.1")
        assert seen.code("rcpt1") == 250
        assert "queued as" in seen.text("data")
        await eventually(lambda: len(handler.messages) == 1)
    assert handler.messages[0].rcpt_tos == ("lead@nhs.net",)
    refused = [r for r in read_records(setup.config.audit_path) if r["event"] == "refused"]
    assert len(refused) == 1
    assert refused[0]["recipient"]["domain"] == "evilnhs.net"
    assert refused[0]["reasons"] == ["insecure_domain:evilnhs.net"]


async def test_receiver_without_starttls_gets_nothing_and_message_is_deferred(
    tmp_path, ca, server_tls_context
):
    """A downstream that offers no STARTTLS is never sent the message in clear."""
    server, port, handler = await start_receiver(tls_context=None)
    try:
        setup = make_setup(tmp_path, ca, receiver_port=port)
        async with running_gateway(setup) as (daemon, smtp_port):
            seen = await asyncio.to_thread(
                smtp_send, smtp_port, setup.client_context, SENDER, ["lead@nhs.net"], message()
            )
            ref = REF.search(seen.text("data")).group()
            await eventually(lambda: daemon.spool.refs(State.DEFERRED) == [ref])
    finally:
        await stop_receiver(server, handler)
    assert handler.messages == []
    deferred = [r for r in read_records(setup.config.audit_path) if r["event"] == "deferred"]
    assert deferred[0]["ref"] == ref
    assert deferred[0]["reason"] == "no_starttls"


async def test_certificate_for_another_name_gets_nothing_and_message_is_deferred(
    tmp_path, ca, receiver
):
    """A downstream whose certificate does not carry the route's name receives nothing."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port, tls_name="mx.other.example")
    async with running_gateway(setup) as (daemon, smtp_port):
        seen = await asyncio.to_thread(
            smtp_send, smtp_port, setup.client_context, SENDER, ["lead@nhs.net"], message()
        )
        ref = REF.search(seen.text("data")).group()
        await eventually(lambda: daemon.spool.refs(State.DEFERRED) == [ref])
    assert handler.messages == []
    deferred = [r for r in read_records(setup.config.audit_path) if r["event"] == "deferred"]
    assert deferred[0]["reason"] == "certificate"


async def test_policy_removed_before_delivery_holds_the_message(tmp_path, ca):
    """A domain dropped from the policy between acceptance and delivery receives nothing."""
    server, port, handler = await start_receiver(tls_context=None)  # first try defers
    try:
        setup = make_setup(tmp_path, ca, receiver_port=port, delivery_extra="")
        async with running_gateway(setup) as (daemon, smtp_port):
            seen = await asyncio.to_thread(
                smtp_send, smtp_port, setup.client_context, SENDER, ["lead@nhs.net"], message()
            )
            ref = REF.search(seen.text("data")).group()
            await eventually(lambda: daemon.spool.refs(State.DEFERRED) == [ref])
            setup.write_policy(
                text='[[secure_domains]]\ndomain = "gcsx.gov.uk"\nsubdomains = true\n'
            )
            await daemon.reload()
            await eventually(lambda: daemon.spool.refs(State.HELD) == [ref])
    finally:
        await stop_receiver(server, handler)
    assert handler.messages == []
    held = [r for r in read_records(setup.config.audit_path) if r["event"] == "held"]
    assert held[0]["ref"] == ref
    assert held[0]["reasons"] == ["insecure_domain:nhs.net"]


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("someone@gmail.com", replies.sender_not_allowed()),
        ("<@relay.example:x@bromley.gcsx.gov.uk>", replies.bad_address("routing_in_address")),
    ],
)
async def test_bad_senders_are_refused_at_mail(tmp_path, ca, receiver, sender, expected):
    """A sender outside the client's domains, or with a source route, is refused at MAIL."""
    port, _handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    raw = sender if sender.startswith("<") else f"<{sender}>"
    async with running_gateway(setup) as (_daemon, smtp_port):
        seen = await asyncio.to_thread(_mail_only, smtp_port, setup.client_context, raw)
    assert f"{seen[0]} {seen[1]}" == expected


def _mail_only(port, context, raw_path):
    """MAIL FROM with a raw path after STARTTLS; return the reply."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="agency.test") as client:
        client.starttls(context=context)
        client.ehlo()
        code, text = client.docmd("MAIL", f"FROM:{raw_path}")
    return code, text.decode()


async def test_message_bounces_after_queue_lifetime_and_content_is_deleted(tmp_path, ca):
    """A downstream that never offers TLS: deferred, then bounced at max_queue_lifetime."""
    server, port, handler = await start_receiver(tls_context=None)
    try:
        setup = make_setup(
            tmp_path, ca, receiver_port=port, delivery_extra="max_queue_lifetime = 2"
        )
        async with running_gateway(setup) as (daemon, smtp_port):
            seen = await asyncio.to_thread(
                smtp_send, smtp_port, setup.client_context, SENDER, ["lead@nhs.net"], message()
            )
            ref = REF.search(seen.text("data")).group()
            await eventually(
                lambda: any(r["event"] == "bounced" for r in read_records(setup.config.audit_path))
            )
            await eventually(lambda: not daemon.spool.refs(State.DEFERRED))
    finally:
        await stop_receiver(server, handler)
    assert handler.messages == []
    events = [(r["event"], r.get("reason")) for r in read_records(setup.config.audit_path)]
    assert ("deferred", "no_starttls") in events
    assert ("bounced", "queue_lifetime") in events
    assert list((setup.root / "spool" / "data").glob(f"{ref}*")) == []
    bounced = next(r for r in read_records(setup.config.audit_path) if r["event"] == "bounced")
    assert bounced["ref"] == ref


async def test_one_connection_per_route_is_reused_for_several_messages(tmp_path, ca, receiver):
    """Messages sent one after another to one route share one verified connection."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    async with running_gateway(setup) as (daemon, smtp_port):
        for number in range(3):
            seen = await asyncio.to_thread(
                smtp_send,
                smtp_port,
                setup.client_context,
                SENDER,
                [f"r{number}@nhs.net"],
                message(),
            )
            assert seen.code("data") == 250
            await eventually(lambda n=number: len(handler.messages) == n + 1)
        deliverer = daemon.worker.deliverer
        assert deliverer.connections_opened == 1
        assert deliverer.connections_reused == 2


async def test_recipients_whose_routes_share_a_server_go_in_one_transaction(tmp_path, ca, receiver):
    """Two secure domains routed to one server: one transaction, one delivered record."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    async with running_gateway(setup) as (daemon, smtp_port):
        seen = await asyncio.to_thread(
            smtp_send,
            smtp_port,
            setup.client_context,
            SENDER,
            ["lead@nhs.net", "officer@met.pnn.police.uk"],
            message(),
        )
        ref = REF.search(seen.text("data")).group()
        await eventually(lambda: not daemon.spool.refs(State.ACTIVE))
    assert [sorted(m.rcpt_tos) for m in handler.messages] == [
        ["lead@nhs.net", "officer@met.pnn.police.uk"]
    ]
    delivered = [r for r in read_records(setup.config.audit_path) if r["event"] == "delivered"]
    assert len(delivered) == 1
    assert delivered[0]["ref"] == ref
    assert len(delivered[0]["recipients"]) == 2


@pytest.mark.parametrize(
    ("header", "recorded"),
    [
        (b"X-Sharing-Purpose: Child_Protection\r\n", "child_protection"),
        (b"X-Sharing-Purpose: about canaryperson at home\r\n", "unlisted"),
        (b"", None),
    ],
)
async def test_sharing_purpose_is_recorded_only_from_the_vocabulary(
    tmp_path, ca, receiver, header, recorded
):
    """A purpose from the policy's vocabulary is recorded; any other text only as unlisted."""
    port, _handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    async with running_gateway(setup) as (_daemon, smtp_port):
        seen = await asyncio.to_thread(
            smtp_send,
            smtp_port,
            setup.client_context,
            SENDER,
            ["lead@nhs.net"],
            message(extra=header),
        )
        assert seen.code("data") == 250
    accepted = next(r for r in read_records(setup.config.audit_path) if r["event"] == "accepted")
    assert accepted.get("purpose") == recorded
    audit_text = "".join(p.read_text() for p in (setup.root / "audit").iterdir() if p.is_file())
    assert "canaryperson" not in audit_text
