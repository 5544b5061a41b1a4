"""A real upstream: Debian's Postfix as an agency server relaying through the gateway.

Postfix (a private instance in a folder of its own, see tests/postfix_agency.py; its log and
config are copied to <tmp_path>/postfix at the end) takes a message on its own smtpd port and
relays it to the gateway with `relayhost`, `smtp_tls_security_level = secure` against the test
CA, and SMTP AUTH from `smtp_sasl_password_maps`. The gateway runs as a real process (its JSON
log lines are read back) and delivers to the test receiver. Every wait is bounded (WAIT).
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trustme

from gateway.audit import read_records, verify_chain
from tests import postfix_agency
from tests.harness import GatewayProcess, GatewaySetup, make_setup, without_dkim
from tests.postfix_agency import PostfixAgency

pytestmark = pytest.mark.skipif(
    not postfix_agency.available(),
    reason="Debian's Postfix is not installed (/usr/sbin/postfix): apt-get install postfix",
)

SENDER = "duty.officer@bromley.gcsx.gov.uk"
RECIPIENT = "lead@nhs.net"
USERNAME = "agency"
PASSWORD = "secret"  # noqa: S105 (a test password)
REF = re.compile(r"SG-[0-9A-HJKMNP-TV-Z]{26}")
WAIT = 30.0
MESSAGE = (
    f"From: Duty Officer <{SENDER}>\r\n"
    f"To: Safeguarding Lead <{RECIPIENT}>\r\n"
    "Subject: OFFICIAL-SENSITIVE referral\r\n"
    "Message-ID: <postfix-upstream-test@bromley.gcsx.gov.uk>\r\n"
    "Date: Wed, 25 Nov 2026 09:00:00 +0000\r\n"
    "\r\n"
    "Relayed by a real Postfix.\r\n"
).encode()


def require_auth(setup: GatewaySetup, username: str, password: str) -> None:
    """Give the test client an auth_username and auth_password_hash."""
    from gateway.passwords import hash_password  # noqa: PLC0415 (written alongside SMTP AUTH)

    text = setup.config_path.read_text()
    anchor = 'name = "test-agency"\n'
    assert text.count(anchor) == 1
    lines = (
        f'auth_username = "{username}"\nauth_password_hash = "{hash_password(password, n=2**14)}"\n'
    )
    setup.config_path.write_text(text.replace(anchor, anchor + lines))


async def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until `predicate()` is true, failing after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def submit(port: int) -> None:
    """Hand the message to Postfix's smtpd in clear text (the agency's internal hop)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="workstation.test", timeout=20) as client:
        refused = client.sendmail(SENDER, [RECIPIENT], MESSAGE)
    assert refused == {}


class Upstream:
    """The gateway process and the Postfix instance in front of it."""

    def __init__(self, root: Path, setup: GatewaySetup) -> None:
        self.root = root
        self.setup = setup
        self.gateway = GatewayProcess(setup)
        self.postfix: PostfixAgency | None = None

    async def start(self, password: str | None, ca_pem: Path | None = None) -> PostfixAgency:
        """Start the gateway, then Postfix relaying to it (with SASL when `password` is set).

        Postfix trusts `ca_pem`, by default the CA that issued the gateway's certificate.
        """
        port = await asyncio.to_thread(self.gateway.start)
        self.postfix = PostfixAgency(
            postfix_agency.instance_root(),
            port,
            ca_pem or self.setup.ca_pem,
            sasl_username=USERNAME if password is not None else None,
            sasl_password=password,
        )
        self.postfix.write_config()
        await asyncio.to_thread(self.postfix.start)
        return self.postfix

    async def stop(self) -> int:
        """Stop Postfix, then the gateway; return the gateway's exit status."""
        if self.postfix is not None:
            await asyncio.to_thread(self.postfix.stop)
            self.postfix.remove(self.root / "postfix")
        if self.gateway.proc is None:
            return 0
        try:
            return await asyncio.to_thread(self.gateway.terminate)
        except subprocess.TimeoutExpired:
            self.gateway.kill()
            raise


@pytest.fixture
async def upstream(tmp_path, ca, receiver) -> AsyncIterator[Upstream]:
    """A gateway config routed to the receiver; everything stopped at the end, whatever fails."""
    port, _ = receiver
    setup = make_setup(tmp_path / "gateway", ca, receiver_port=port)
    running = Upstream(tmp_path, setup)
    try:
        yield running
    finally:
        status = await running.stop()
    assert status == 0, "".join(running.gateway.output)


async def test_postfix_relays_through_the_gateway_over_verified_tls_with_sasl(upstream, receiver):
    """Postfix -> gateway (STARTTLS verified, AUTH) -> receiver: one decision header, logged."""
    _, handler = receiver
    require_auth(upstream.setup, USERNAME, PASSWORD)
    postfix = await upstream.start(PASSWORD)

    await asyncio.to_thread(submit, postfix.smtpd_port)
    sent = await asyncio.to_thread(
        postfix.wait_for_log, r"status=sent \(250 2\.0\.0 Ok: queued as (SG-\w+)\)", WAIT
    )
    ref = sent.group(1)
    assert REF.fullmatch(ref)
    await eventually(lambda: len(handler.messages) == 1)

    log = postfix.log_text()
    sent_line = next(line for line in log.splitlines() if ref in line)
    assert "relay=localhost[127.0.0.1]:" in sent_line
    assert f"to=<{RECIPIENT}>" in sent_line
    assert re.search(r"Verified TLS connection established to localhost\[127\.0\.0\.1\]", log)
    assert "SASL authentication failed" not in log

    got = handler.messages[0]
    assert got.mail_from == SENDER
    assert got.rcpt_tos == (RECIPIENT,)
    assert got.tls_version is not None
    headers = got.content.split(b"\r\n\r\n", 1)[0]
    decisions = [h for h in headers.split(b"\r\n") if h.startswith(b"X-Safeguarding-Decision:")]
    assert len(decisions) == 1
    assert decisions[0].startswith(f"X-Safeguarding-Decision: {ref}; verdict=released".encode())
    assert b"by mail.bromley.gcsx.gov.uk (Postfix) with ESMTP" in headers
    assert got.content.endswith(b"\r\n\r\nRelayed by a real Postfix.\r\n")

    events = upstream.gateway.events()
    logins = [e for e in events if e.get("event") == "client_authenticated"]
    assert [e["client"] for e in logins] == ["test-agency"]
    assert logins[0]["mechanism"] in {"PLAIN", "LOGIN"}
    assert not [e for e in events if e.get("event") == "auth_failed"]

    audit = upstream.setup.config.audit_path
    verify_chain(audit)
    kinds = [r["event"] for r in read_records(audit) if r.get("ref") == ref]
    assert kinds.count("accepted") == 1
    assert kinds[-1] == "delivered"
    accepted = next(r for r in read_records(audit) if r.get("ref") == ref)
    assert accepted["client"] == "test-agency"
    assert accepted["verdict"] == "release"


async def test_postfix_with_a_wrong_sasl_password_gets_nothing_through(upstream, receiver):
    """A wrong password: the gateway answers 535, Postfix defers, the receiver gets nothing."""
    _, handler = receiver
    require_auth(upstream.setup, USERNAME, PASSWORD)
    postfix = await upstream.start("not-the-secret")

    await asyncio.to_thread(submit, postfix.smtpd_port)
    deferred = await asyncio.to_thread(postfix.wait_for_log, r".*status=deferred.*", WAIT)
    line = deferred.group(0)
    assert "SASL authentication failed" in line
    assert "535 5.7.8" in line
    assert "relay=localhost[127.0.0.1]:" in line
    assert "Verified TLS connection established" in postfix.log_text()

    await eventually(
        lambda: any(e.get("event") == "auth_failed" for e in upstream.gateway.events())
    )
    assert handler.messages == []
    assert "queued as SG-" not in postfix.log_text()
    assert "not-the-secret" not in "".join(upstream.gateway.output)
    audit = upstream.setup.config.audit_path
    assert [r for r in read_records(audit) if r["event"] in {"accepted", "delivered"}] == []


async def test_postfix_relays_over_verified_tls_to_a_client_without_auth(upstream, receiver):
    """Without auth_username the gateway takes Postfix's mail on TLS and network alone."""
    _, handler = receiver
    postfix = await upstream.start(None)

    await asyncio.to_thread(submit, postfix.smtpd_port)
    sent = await asyncio.to_thread(
        postfix.wait_for_log, r"status=sent \(250 2\.0\.0 Ok: queued as (SG-\w+)\)", WAIT
    )
    await eventually(lambda: len(handler.messages) == 1)
    assert without_dkim(handler.messages[0].content).startswith(
        f"X-Safeguarding-Decision: {sent.group(1)}; verdict=released".encode()
    )


async def test_postfix_does_not_relay_to_a_gateway_it_cannot_verify(upstream, receiver, tmp_path):
    """`secure` is real: a Postfix trusting another CA defers and never sends MAIL or AUTH."""
    _, handler = receiver
    require_auth(upstream.setup, USERNAME, PASSWORD)
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    postfix = await upstream.start(PASSWORD, other_ca)

    await asyncio.to_thread(submit, postfix.smtpd_port)
    deferred = await asyncio.to_thread(postfix.wait_for_log, r".*status=deferred.*", WAIT)
    assert "Server certificate not verified" in deferred.group(0)
    assert "certificate verification failed for localhost[127.0.0.1]" in postfix.log_text()
    assert "untrusted issuer" in postfix.log_text()
    assert "Verified TLS connection established" not in postfix.log_text()
    assert handler.messages == []
    events = upstream.gateway.events()
    assert not [e for e in events if e.get("event") in {"client_authenticated", "auth_failed"}]
    assert not [e for e in events if e.get("event") == "message_accepted"]
