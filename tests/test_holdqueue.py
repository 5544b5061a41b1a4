"""The admin's hold queue against a running daemon: release, reject, expiry, notices."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import pytest

from gateway.audit import read_records
from tests.harness import GatewayProcess, eventually, make_setup, smtp_send, without_dkim

SENDER = "duty.officer@bromley.gcsx.gov.uk"
REF = re.compile(r"SG-[0-9A-HJKMNP-TV-Z]{26}")
CANARY_BODY = b"Subject: OFFICIAL-SENSITIVE canarysubject\r\n\r\ncanarybody about a child\r\n"


def gateway_cli(setup, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the gateway command against the set-up's config."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args, "--config", str(setup.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def to_lead(handler) -> list:
    """Messages the receiver got for lead@nhs.net."""
    return [m for m in handler.messages if "lead@nhs.net" in m.rcpt_tos]


def notices(handler) -> list:
    """Notices the receiver got (sent from the null path)."""
    return [m for m in handler.messages if m.mail_from == "<>"]


def events(setup, ref):
    """The audit events about one message, in order."""
    return [r for r in read_records(setup.config.audit_path) if r.get("ref") == ref]


@pytest.fixture
async def held(tmp_path, ca, receiver):
    """A running daemon and a message held for lead@nhs.net + someone@gmail.com."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    process = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(process.start)
    seen = await asyncio.to_thread(
        smtp_send,
        smtp_port,
        setup.client_context,
        SENDER,
        ["lead@nhs.net", "someone@gmail.com"],
        CANARY_BODY,
    )
    ref = REF.search(seen.text("data")).group()
    assert "held as" in seen.text("data")
    await eventually(lambda: len(notices(handler)) == 1)  # the held notice
    yield setup, process, handler, ref, smtp_port
    assert await asyncio.to_thread(process.terminate) == 0


async def test_queue_list_shows_the_held_message_without_content(held):
    """`queue list --json` shows the held message with domains and reasons only."""
    setup, _process, _handler, ref, _ = held
    result = await asyncio.to_thread(
        gateway_cli, setup, "queue", "list", "--state", "held", "--json"
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["ref"] for r in rows] == [ref]
    row = rows[0]
    assert row["recipient_domains"] == ["gmail.com", "nhs.net"]
    assert row["reasons"] == ["insecure_domain:gmail.com"]
    assert row["releasable"] is False
    assert "canary" not in result.stdout
    assert "someone" not in result.stdout


async def test_release_without_drop_is_refused_while_a_domain_is_insecure(held):
    """Release is refused, naming the insecure domain, and nothing is sent."""
    setup, _process, handler, ref, _ = held
    result = await asyncio.to_thread(gateway_cli, setup, "queue", "release", ref, "--reason", "ok")
    assert result.returncode == 1
    assert "gmail.com" in result.stderr
    assert "--drop-insecure" in result.stderr
    assert to_lead(handler) == []
    assert [r["event"] for r in events(setup, ref)] == ["accepted"]


async def test_release_dropping_insecure_delivers_once_and_records_the_actor(held):
    """--drop-insecure: recorded with the Unix user, the secure recipient gets it, once."""
    setup, _process, handler, ref, _ = held
    result = await asyncio.to_thread(
        gateway_cli,
        setup,
        "queue",
        "release",
        ref,
        "--reason",
        "checked by IG lead",
        "--drop-insecure",
    )
    assert result.returncode == 0, result.stderr
    assert "dropped recipients in gmail.com" in result.stdout
    await eventually(lambda: len(to_lead(handler)) == 1)
    got = to_lead(handler)[0]
    assert got.rcpt_tos == ("lead@nhs.net",)
    assert without_dkim(got.content).startswith(b"X-Safeguarding-Decision: " + ref.encode())
    again = await asyncio.to_thread(gateway_cli, setup, "queue", "release", ref, "--reason", "x")
    assert again.returncode == 1
    assert ref in again.stderr
    released = [r for r in events(setup, ref) if r["event"] == "released"]
    assert len(released) == 1
    assert released[0]["actor"] == "root"
    assert released[0]["reason"] == "checked by IG lead"
    assert len(released[0]["recipients"]) == 1
    await eventually(lambda: len(notices(handler)) == 2)  # held, then dropped


async def test_two_concurrent_releases_deliver_exactly_once(held):
    """Two CLI processes releasing the same message at once: one succeeds, one delivery."""
    setup, _process, handler, ref, _ = held
    command = ["queue", "release", ref, "--reason", "race", "--drop-insecure"]
    first, second = await asyncio.gather(
        asyncio.to_thread(gateway_cli, setup, *command),
        asyncio.to_thread(gateway_cli, setup, *command),
    )
    assert sorted([first.returncode, second.returncode]) == [0, 1]
    await eventually(lambda: len(to_lead(handler)) == 1)
    assert len([r for r in events(setup, ref) if r["event"] == "released"]) == 1
    assert [r for r in events(setup, ref) if r["event"] == "delivered"] != []
    assert len(to_lead(handler)) == 1


async def test_reject_purges_content_and_tells_the_sender_without_content(held):
    """Reject: recorded, content deleted, and the notice holds no canary of the original."""
    setup, _process, handler, ref, _ = held
    result = await asyncio.to_thread(
        gateway_cli, setup, "queue", "reject", ref, "--reason", "not for gmail"
    )
    assert result.returncode == 0, result.stderr
    await eventually(lambda: len(notices(handler)) == 2)
    assert [r["event"] for r in events(setup, ref)] == ["accepted", "rejected"]
    assert not list((setup.root / "spool" / "data").glob(f"{ref}*"))
    for notice in notices(handler):
        assert notice.rcpt_tos == (SENDER,)
        assert b"canary" not in notice.content
        assert b"someone" not in notice.content
        assert ref.encode() in notice.content
    assert b"not for gmail" in notices(handler)[1].content
    assert to_lead(handler) == []


async def test_release_after_the_policy_makes_every_domain_secure(held):
    """After a reload that lists gmail.com, the message is releasable and releases whole."""
    setup, _process, handler, ref, _ = held
    setup.write_policy(
        text='[[secure_domains]]\ndomain = "nhs.net"\n\n[[secure_domains]]\ndomain = "gmail.com"\n'
    )
    reload = await asyncio.to_thread(gateway_cli, setup, "reload")
    assert reload.returncode == 0, reload.stderr
    listing = await asyncio.to_thread(gateway_cli, setup, "queue", "list", "--json")
    assert [r["releasable"] for r in json.loads(listing.stdout) if r["ref"] == ref] == [True]
    result = await asyncio.to_thread(gateway_cli, setup, "queue", "release", ref, "--reason", "ok")
    assert result.returncode == 0, result.stderr
    await eventually(lambda: len(to_lead(handler)) == 1)


async def test_held_message_expires_after_max_age(tmp_path, ca, receiver):
    """Past [hold] max_age a held message is rejected as expired, its sender told."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    text = setup.config_path.read_text() + "\n[hold]\nmax_age = 1\n"
    setup.config_path.write_text(text)
    process = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(process.start)
    try:
        seen = await asyncio.to_thread(
            smtp_send, smtp_port, setup.client_context, SENDER, ["x@gmail.com"], CANARY_BODY
        )
        ref = REF.search(seen.text("data")).group()
        await eventually(lambda: "expired" in [r["event"] for r in events(setup, ref)])
        await eventually(lambda: len(notices(handler)) == 2)  # held, then expired
    finally:
        assert await asyncio.to_thread(process.terminate) == 0
    assert [r["event"] for r in events(setup, ref)] == ["accepted", "expired"]
    assert not list((setup.root / "spool" / "data").glob(f"{ref}*"))


async def test_actions_work_without_a_running_daemon(tmp_path, ca, receiver):
    """With the daemon stopped, reject works on the spool directly and is recorded."""
    port, _handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    process = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(process.start)
    seen = await asyncio.to_thread(
        smtp_send, smtp_port, setup.client_context, SENDER, ["x@gmail.com"], CANARY_BODY
    )
    ref = REF.search(seen.text("data")).group()
    assert await asyncio.to_thread(process.terminate) == 0
    listing = await asyncio.to_thread(gateway_cli, setup, "queue", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert ref in [r["ref"] for r in json.loads(listing.stdout)]
    result = await asyncio.to_thread(
        gateway_cli, setup, "queue", "reject", ref, "--reason", "offline"
    )
    assert result.returncode == 0, result.stderr
    assert [r["event"] for r in events(setup, ref)][-1] == "rejected"
    shown = await asyncio.to_thread(gateway_cli, setup, "queue", "show", ref)
    assert shown.returncode == 1
    assert "not in the queue" in shown.stderr
