"""The daemon as a real process: SIGKILL and restart, storage failure, no personal data out."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys

from gateway import replies
from gateway.audit import read_records, verify_chain
from gateway.keys import init_keys
from tests.harness import GatewayProcess, eventually, make_setup, smtp_send, without_dkim
from tests.receiver import start_receiver, stop_receiver

SENDER = "duty.officer@bromley.gcsx.gov.uk"
REF = re.compile(r"SG-[0-9A-HJKMNP-TV-Z]{26}")


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
    """Canaries in subject, body, display names and local parts appear in no record or log.

    The run provokes accepted (release and hold), delivered, bounced, released, rejected,
    checkpoint and policy records, and reads them back through every CLI output.
    """
    port, handler = receiver
    handler.fail_rcpt["canarybounce@met.pnn.police.uk"] = 550
    setup = make_setup(tmp_path, ca, receiver_port=port)
    process = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(process.start)
    canaries = ["canarysubject", "canarybody", "canaryname", "canarysender", "canarylead"]
    canaries += ["canaryheld", "canarybounce"]
    message = (
        b'From: "Canaryname Person" <canarysender@bromley.gcsx.gov.uk>\r\n'
        b"To: Canaryname Lead <canarylead@nhs.net>\r\n"
        b"Subject: OFFICIAL canarysubject about a child\r\n\r\ncanarybody text\r\n"
    )
    sender = "canarysender@bromley.gcsx.gov.uk"

    def send(*recipients: str):
        return smtp_send(smtp_port, setup.client_context, sender, list(recipients), message)

    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", *args, "--config", str(setup.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode in (0, 1), result.stderr
        return result.stdout + result.stderr

    outputs = []
    try:
        released = await asyncio.to_thread(send, "canarylead@nhs.net")
        to_release = await asyncio.to_thread(send, "canaryheld@gmail.com", "canarylead2@nhs.net")
        to_reject = await asyncio.to_thread(send, "canaryheld3@gmail.com")
        bounced = await asyncio.to_thread(send, "canarybounce@met.pnn.police.uk")
        refused = await asyncio.to_thread(send, "canaryheld%x@nhs.net")
        assert released.code("data") == bounced.code("data") == 250
        assert refused.code("rcpt0") == 553
        release_ref = REF.search(to_release.text("data")).group()
        reject_ref = REF.search(to_reject.text("data")).group()
        outputs.append(await asyncio.to_thread(cli, "queue", "list", "--json"))
        outputs.append(await asyncio.to_thread(cli, "queue", "show", release_ref, "--json"))
        outputs.append(
            await asyncio.to_thread(
                cli, "queue", "release", release_ref, "--reason", "approved", "--drop-insecure"
            )
        )
        outputs.append(
            await asyncio.to_thread(cli, "queue", "reject", reject_ref, "--reason", "not secure")
        )
        await eventually(
            lambda: sum("canarylead" in " ".join(m.rcpt_tos) for m in handler.messages) == 2
        )
    finally:
        assert await asyncio.to_thread(process.terminate) == 0
    reads = (
        ("audit", "search"),
        ("audit", "search", "--json"),
        ("audit", "show", release_ref),
        ("audit", "export", "--format", "csv"),
        ("audit", "verify"),
        ("queue", "list"),
    )
    outputs += [await asyncio.to_thread(cli, *args) for args in reads]
    audit_text = "".join(p.read_text() for p in (setup.root / "audit").iterdir()).lower()
    events = {r["event"] for r in read_records(setup.config.audit_path)}
    assert events >= {"accepted", "delivered", "bounced", "released", "rejected", "checkpoint"}
    output = ("".join(process.output) + "".join(outputs)).lower()
    spool_bytes = b"".join(p.read_bytes() for p in (setup.root / "spool").rglob("*") if p.is_file())
    assert "message_accepted" in output
    assert '"marking":"official"' in audit_text
    for canary in canaries:
        assert canary not in audit_text
        assert canary not in output
        assert canary.encode() not in spool_bytes.lower()


async def test_daemon_refuses_to_extend_a_log_sealed_with_another_key(tmp_path, ca, receiver):
    """Started with a different audit-signing key, the daemon stops with one clear line."""
    port, _handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    first = GatewayProcess(setup)
    await asyncio.to_thread(first.start)
    assert await asyncio.to_thread(first.terminate) == 0
    before = sorted(p.read_bytes() for p in (setup.root / "audit").glob("transfer-*.jsonl"))
    shutil.rmtree(setup.root / "keys")
    init_keys(setup.root / "keys")
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(setup.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "sealed with key" in result.stderr
    after = sorted(p.read_bytes() for p in (setup.root / "audit").glob("transfer-*.jsonl"))
    assert after == before
