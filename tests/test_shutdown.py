"""Graceful stop under load: SIGTERM, restart, and every 250 delivered exactly once."""

from __future__ import annotations

import asyncio
import collections
import re
import smtplib
import threading
import time

from gateway import replies
from gateway.audit_verify import verify
from gateway.keys import load_public_key
from tests.harness import GatewayProcess, eventually, make_setup, smtp_send
from tests.test_smtp_in import RawClient

SENDER = "duty.officer@bromley.gcsx.gov.uk"
REF = re.compile(rb"SG-[0-9A-HJKMNP-TV-Z]{26}")


def load(port, context, stop: threading.Event, accepted: list[str], lock: threading.Lock) -> None:
    """Send messages one after another until told to stop; record each reference answered 250."""
    while not stop.is_set():
        try:
            seen = smtp_send(port, context, SENDER, ["lead@nhs.net"], b"Subject: load\r\n\r\nx\r\n")
        except (OSError, smtplib.SMTPException):
            return  # the gateway went away mid-session: an unknown outcome, not counted
        step = "data" if any(s == "data" for s, _, _ in seen.steps) else "mail"
        if seen.code(step) != 250:
            return  # 421 while shutting down: the client would retry elsewhere
        found = REF.search(seen.text("data").encode())
        if found:
            with lock:
                accepted.append(found.group().decode())


async def test_sigterm_under_load_then_restart_delivers_every_250_exactly_once(
    tmp_path, ca, receiver
):
    """SIGTERM mid-load exits 0; after a restart each message answered 250 arrives once."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    first = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(first.start)
    stop, lock, accepted = threading.Event(), threading.Lock(), []
    senders = [
        threading.Thread(target=load, args=(smtp_port, setup.client_context, stop, accepted, lock))
        for _ in range(8)
    ]
    for thread in senders:
        thread.start()
    await eventually(lambda: len(accepted) >= 40)
    assert await asyncio.to_thread(first.terminate) == 0
    stop.set()
    for thread in senders:
        await asyncio.to_thread(thread.join, 30)
    second = GatewayProcess(setup)
    await asyncio.to_thread(second.start)

    def delivered() -> collections.Counter[str]:
        return collections.Counter(
            found.group().decode()
            for m in handler.messages
            if (found := REF.search(m.content)) is not None
        )

    try:
        await eventually(lambda: set(accepted) <= set(delivered()))
    finally:
        assert await asyncio.to_thread(second.terminate) == 0
    counts = delivered()
    assert [ref for ref in accepted if counts[ref] != 1] == []
    assert [ref for ref, count in counts.items() if count != 1] == []
    stopping = [e for e in first.events() if e.get("event") == "daemon_stopping"]
    assert len(stopping) == 1
    report = verify(
        setup.config.audit_path, load_public_key(setup.root / "keys" / "audit-signing.pub")
    )
    assert (report.ok, report.unsealed) == (True, 0)


async def test_new_connection_during_shutdown_gets_421(tmp_path, ca, receiver):
    """While a busy session finishes, a new connection is told 421 4.3.2."""
    port, _handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port, server_extra="shutdown_grace = 10")
    process = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(process.start)
    busy = await RawClient.connect(smtp_port)
    await busy.reply()
    await busy.starttls(setup.client_context)
    assert await busy.command(f"MAIL FROM:<{SENDER}>") == replies.SENDER_OK
    process.proc.send_signal(15)
    await eventually(lambda: any(e.get("event") == "daemon_stopping" for e in process.events()))
    late = await RawClient.connect(smtp_port)
    assert await late.reply() == replies.SHUTTING_DOWN
    await late.close()
    # The busy session may still finish its message, then is told goodbye.
    assert await busy.command("RCPT TO:<lead@nhs.net>") == replies.RECIPIENT_OK
    assert (await busy.command("DATA")).startswith("354")
    await busy.send_raw(b"Subject: last\r\n\r\nlast one\r\n.\r\n")
    assert "queued as" in await busy.reply()
    assert await busy.reply() == replies.SHUTTING_DOWN
    await busy.close()
    started = time.monotonic()
    assert await asyncio.to_thread(process.finish, 30) == 0
    assert time.monotonic() - started < 30
