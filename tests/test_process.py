"""The daemon as a real process: SIGKILL and restart, storage failure, no personal data out."""

from __future__ import annotations

import asyncio
import re

from gateway import replies
from gateway.audit import read_records, verify_chain
from tests.harness import GatewayProcess, make_setup, smtp_send, without_dkim
from tests.receiver import start_receiver, stop_receiver

SENDER = "duty.officer@bromley.gcsx.gov.uk"
REF = re.compile(r"SG-[0-9A-HJKMNP-TV-Z]{26}")


async def eventually(predicate, timeout: float = 20.0) -> None:
    """Wait until `predicate()` is true, failing after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def free_port(server_tls_context) -> int:
    """A loopback port with nothing listening on it (a receiver started and stopped)."""
    server, port, handler = await start_receiver(tls_context=server_tls_context)
    await stop_receiver(server, handler)
    return port


async def test_message_accepted_before_sigkill_is_delivered_after_restart(
    tmp_path, ca, server_tls_context
):
    """A 250 survives kill -9: after a restart the message is delivered, recorded once."""
    port = await free_port(server_tls_context)
    setup = make_setup(tmp_path, ca, receiver_port=port)
    first = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(first.start)
    body = b"Subject: test\r\n\r\nkill -9 survivor\r\n"
    try:
        seen = await asyncio.to_thread(
            smtp_send, smtp_port, setup.client_context, SENDER, ["lead@nhs.net"], body
        )
    finally:
        first.kill()
    assert seen.code("data") == 250
    ref = REF.search(seen.text("data")).group()

    server, _, handler = await start_receiver(tls_context=server_tls_context, port=port)
    second = GatewayProcess(setup)
    try:
        await asyncio.to_thread(second.start)
        await eventually(lambda: len(handler.messages) == 1)
    finally:
        assert await asyncio.to_thread(second.terminate) == 0
        await stop_receiver(server, handler)
    got = handler.messages[0]
    assert without_dkim(got.content).startswith(b"X-Safeguarding-Decision: " + ref.encode())
    assert got.content.endswith(b"\r\n\r\nkill -9 survivor\r\n")
    verify_chain(setup.config.audit_path)
    events = [r["event"] for r in read_records(setup.config.audit_path) if r.get("ref") == ref]
    assert events.count("accepted") == 1
    assert events[-1] == "delivered"
    assert not list((setup.root / "spool" / "tmp").iterdir())


async def test_spool_write_failure_answers_452_and_keeps_nothing(tmp_path, ca, receiver):
    """A real EFBIG while spooling is a 452 4.3.1; nothing is left; small mail still flows."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    process = GatewayProcess(setup, file_size_limit=64 * 1024)
    smtp_port = await asyncio.to_thread(process.start)
    big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    try:
        seen = await asyncio.to_thread(
            smtp_send, smtp_port, setup.client_context, SENDER, ["lead@nhs.net"], big * 200
        )
        assert f"{seen.code('data')} {seen.text('data')}" == replies.SPOOL_FAILED
        small = await asyncio.to_thread(
            smtp_send, smtp_port, setup.client_context, SENDER, ["lead@nhs.net"], b"\r\nsmall\r\n"
        )
        assert small.code("data") == 250
        await eventually(lambda: any(m.mail_from != "<>" for m in handler.messages))
    finally:
        assert await asyncio.to_thread(process.terminate) == 0
    spool = setup.root / "spool"
    leftovers = [p for p in spool.rglob("*") if p.is_file() and p.name != "lock"]
    assert leftovers == []
    assert all(
        r["size"] < 1000 for r in read_records(setup.config.audit_path) if r["event"] == "accepted"
    )


async def test_no_personal_data_in_audit_log_daemon_output_or_spool(tmp_path, ca, receiver):
    """Canaries in subject, body, display names and local parts appear in no record or log."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    process = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(process.start)
    canaries = [
        "canarysubject",
        "canarybody",
        "canaryname",
        "canarysender",
        "canarylead",
        "canaryheld",
    ]
    message = (
        b'From: "Canaryname Person" <canarysender@bromley.gcsx.gov.uk>\r\n'
        b"To: Canaryname Lead <canarylead@nhs.net>\r\n"
        b"Subject: OFFICIAL canarysubject about a child\r\n\r\ncanarybody text\r\n"
    )
    sender = "canarysender@bromley.gcsx.gov.uk"
    try:
        released = await asyncio.to_thread(
            smtp_send, smtp_port, setup.client_context, sender, ["canarylead@nhs.net"], message
        )
        held = await asyncio.to_thread(
            smtp_send, smtp_port, setup.client_context, sender, ["canaryheld@gmail.com"], message
        )
        refused = await asyncio.to_thread(
            smtp_send, smtp_port, setup.client_context, sender, ["canaryheld%x@nhs.net"], message
        )
        assert released.code("data") == 250
        assert "held as" in held.text("data")
        assert refused.code("rcpt0") == 553
        await eventually(lambda: any("canarylead@nhs.net" in m.rcpt_tos for m in handler.messages))
    finally:
        assert await asyncio.to_thread(process.terminate) == 0
    audit_text = "".join(p.read_text() for p in (setup.root / "audit").iterdir()).lower()
    output = "".join(process.output).lower()
    spool_bytes = b"".join(p.read_bytes() for p in (setup.root / "spool").rglob("*") if p.is_file())
    assert "message_accepted" in output
    assert '"marking":"official"' in audit_text
    for canary in canaries:
        assert canary not in audit_text
        assert canary not in output
        assert canary.encode() not in spool_bytes.lower()
