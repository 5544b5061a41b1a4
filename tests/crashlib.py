"""Crash trials: load through a real gateway, SIGKILL at a random moment, restart, check.

Shared by `bench/crash.py` (hundreds of trials) and `tests/test_crash.py` (a few in `make test`).

One trial:

1. a receiver (aiosmtpd in this event loop, STARTTLS with a trustme certificate) takes the routes
   of the secure domains *and* of gmail.com, so that a message to an insecure domain that the
   gateway ever released would arrive and be caught;
2. the gateway runs as a real subprocess (`tests.harness.GatewayProcess`); a few client threads
   send messages, each with a unique token in its body, most to `lead@nhs.net`, some to
   `someone@gmail.com` (held by policy), a few with a bare LF that the gateway must refuse
   after the final dot (550 5.6.0). Each message ends as one of
   - ACK: the DATA reply was 250 (its reference is kept),
   - NACK: a 4xx/5xx reply at MAIL, RCPT or DATA,
   - UNK: the final dot was sent and the connection died before a reply,
   - NOSEND: the connection died before the final dot was sent (cannot have been accepted);
3. after a random number of ACKs or a random delay, the gateway is killed with SIGKILL;
4. it is started again on the same spool, audit log and keys, with no repair by hand, and
   runs until every ACKed secure message has arrived (bounded), then is stopped with SIGTERM;
5. the invariants are checked (`check`):
   - every ACKed secure message delivered, its original bytes identical to what was sent (the
     delivered content is the gateway's DKIM-Signature, X-Safeguarding-Decision and Received
     fields, then the original message), carrying the reference of its 250;
   - nothing answered NACK or NOSEND delivered, no bare-LF message accepted or delivered,
     nothing without a token delivered;
   - a duplicate only where it is explained: the audit log has a `deferred` record with reason
     `ambiguous` for it, or one copy arrived from the killed gateway and one after the restart
     (the kill fell between the downstream 250 and the spool removal: Postfix's window too;
     counted apart as "recorded" when the killed gateway's `delivered` record is in the log,
     "unrecorded" when the kill came before that record was durable);
   - nothing left in spool/tmp, no temporary file in the audit or key folders, every `.msg`
     with its envelope and the reverse;
   - the audit log verifies with the public key (a torn line sealed by `log_repaired` is fine),
     and has exactly one `accepted` record for each ACK;
   - nothing delivered to gmail.com (or without TLS); every ACKed insecure message is in held/;
   - the restarted gateway started by itself and stopped with status 0.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import re
import shutil
import signal
import smtplib
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from gateway.audit import read_records
from gateway.audit_verify import verify
from gateway.errors import GatewayError
from gateway.keys import load_public_key
from tests.harness import CONTROL_DIRS, GatewayProcess, GatewaySetup, make_setup, without_dkim
from tests.receiver import Received, Receiver, start_receiver, stop_receiver

SENDER = "duty.officer@bromley.gcsx.gov.uk"
SECURE_RECIPIENT = "lead@nhs.net"
INSECURE_RECIPIENT = "someone@gmail.com"
INSECURE_DOMAINS = frozenset({"gmail.com"})
TOKEN = re.compile(rb"CRASHTOKEN-[0-9a-f]{24}")
REF = re.compile(r"SG-[0-9A-HJKMNP-TV-Z]{26}")
DECISION = b"X-Safeguarding-Decision: "

ACK, NACK, UNK, NOSEND = "ACK", "NACK", "UNK", "NOSEND"
OUTCOMES = (ACK, NACK, UNK, NOSEND)
DUPLICATE_KINDS = ("ambiguous_in_log", "crash_window_recorded", "crash_window_unrecorded")
CLIENT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Settings:
    """How hard a trial pushes; the defaults are the bench's, `FAST` the test suite's."""

    clients: int = 4
    insecure_share: float = 0.15
    refused_share: float = 0.05  # a bare LF in the body: 550 5.6.0 after the whole DATA
    max_kill_acks: int = 40  # "acks" mode: kill after 0..N ACKs
    max_kill_delay: float = 1.5  # "delay" mode: kill after 0..N seconds
    kill_cap: float = 4.0  # never wait longer than this for the kill moment
    max_messages_per_client: int = 400
    deliver_timeout: float = 20.0
    stop_timeout: float = 20.0
    checkpoint_every: int = 20  # small, so that kills also land around checkpoints


FAST = Settings(clients=3, max_kill_acks=20, max_kill_delay=0.8, deliver_timeout=15.0)


@dataclass
class Sent:
    """One message a client tried to send, and what the client saw."""

    token: str
    secure: bool
    body: bytes
    refusable: bool = False  # carries a bare LF: must never be accepted, whatever the client saw
    outcome: str | None = None
    code: int | None = None
    ref: str | None = None


@dataclass
class TrialResult:
    """What one trial did and found."""

    seed: int
    kill: str = ""
    sent: list[Sent] = field(default_factory=list)
    copies: int = 0  # messages with a token the receiver got
    notices: int = 0  # notices from <> (held notices to the sender)
    unk_delivered: int = 0
    duplicates: Counter[str] = field(default_factory=Counter)
    unexplained: int = 0
    recovered: int = 0  # spool_recovered events of the restarted gateway
    repaired: int = 0  # log_repaired records in the audit log
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    root: Path | None = None

    def count(self, outcome: str) -> int:
        """How many messages ended with `outcome`."""
        return sum(s.outcome == outcome for s in self.sent)

    def summary(self) -> str:
        """One line for the bench's output."""
        explained = sum(self.duplicates.values())
        return (
            f"seed={self.seed} kill={self.kill} "
            + " ".join(f"{o}={self.count(o)}" for o in OUTCOMES)
            + f" copies={self.copies} unk_delivered={self.unk_delivered}"
            f" dup={explained}/{self.unexplained} recovered={self.recovered}"
            f" repaired={self.repaired} violations={len(self.violations)} {self.seconds:.1f}s"
        )


# -- messages and clients ---------------------------------------------------------------------


def make_message(rng: random.Random, *, secure: bool, refusable: bool = False) -> Sent:
    """A message with a unique token; mostly small, some over one 64 KiB spool chunk.

    Lines are CRLF, at most 78 characters, and never start with a dot (no stuffing needed);
    a `refusable` one has a bare LF at its end, which the gateway refuses after the final dot.
    """
    token = f"CRASHTOKEN-{rng.getrandbits(96):024x}"
    recipient = SECURE_RECIPIENT if secure else INSECURE_RECIPIENT
    head = (
        f"From: Duty Officer <{SENDER}>\r\n"
        f"To: Lead <{recipient}>\r\n"
        "Subject: OFFICIAL crash trial\r\n"
        f"Message-ID: <{token.lower()}@bromley.gcsx.gov.uk>\r\n"
        "\r\n"
        f"token {token}\r\n"
    ).encode()
    draw = rng.random()
    size = rng.randint(0, 2000) if draw < 0.7 else rng.randint(2000, 200_000)
    filler = base64.b64encode(rng.randbytes(size * 3 // 4 + 3))[:size]
    lines = [b"x" + filler[i : i + 76] for i in range(0, len(filler), 76)]
    tail = b"bare\nline feed\r\n" if refusable else b""
    body = head + b"".join(line + b"\r\n" for line in lines) + tail
    return Sent(token, secure, body, refusable=refusable)


def send_one(port: int, context: ssl.SSLContext, sent: Sent) -> None:
    """Send one message over STARTTLS; set `outcome`, `code` and `ref` on `sent`."""
    recipient = SECURE_RECIPIENT if sent.secure else INSECURE_RECIPIENT
    dot_sent = False
    try:
        with smtplib.SMTP(
            "127.0.0.1", port, local_hostname="agency.test", timeout=CLIENT_TIMEOUT
        ) as client:
            client.ehlo()
            client.starttls(context=context)
            client.ehlo()
            for command, argument, want in (
                ("MAIL", f"FROM:<{SENDER}>", 250),
                ("RCPT", f"TO:<{recipient}>", 250),
                ("DATA", "", 354),
            ):
                code, _ = client.docmd(command, argument)
                if code != want:
                    sent.outcome, sent.code = NACK, code
                    return
            client.send(sent.body + b".\r\n")
            dot_sent = True
            code, text = client.getreply()
            sent.code = code
            if code == 250:
                found = REF.search(text.decode("ascii", "replace"))
                sent.ref = found.group() if found else None
                sent.outcome = ACK
            else:
                sent.outcome = NACK
    except (OSError, smtplib.SMTPException):
        if sent.outcome is None:  # a failed QUIT after the reply changes nothing
            sent.outcome = UNK if dot_sent else NOSEND


class Load:
    """Client threads sending messages one after another until stopped (bounded)."""

    def __init__(
        self, port: int, context: ssl.SSLContext, rng: random.Random, settings: Settings
    ) -> None:
        self.port, self.context, self.settings = port, context, settings
        self.sent: list[Sent] = []
        self.acks = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(
                target=self._client, args=(random.Random(rng.getrandbits(64)),), daemon=True
            )
            for _ in range(settings.clients)
        ]

    def start(self) -> None:
        """Start every client."""
        for thread in self.threads:
            thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Tell the clients to stop and wait for them (blocking)."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _client(self, rng: random.Random) -> None:
        for _ in range(self.settings.max_messages_per_client):
            if self.stopping.is_set():
                return
            draw = rng.random()
            sent = make_message(
                rng,
                secure=draw >= self.settings.insecure_share,
                refusable=draw >= 1 - self.settings.refused_share,
            )
            with self.lock:
                self.sent.append(sent)
            send_one(self.port, self.context, sent)
            if sent.outcome == ACK:
                with self.lock:
                    self.acks += 1


# -- one trial ----------------------------------------------------------------------------------


def insecure_route(port: int) -> str:
    """A `[[delivery.routes]]` entry sending gmail.com to the receiver too (bait)."""
    return (
        '\n[[delivery.routes]]\ndomain = "gmail.com"\nsubdomains = false\n'
        f'host = "127.0.0.1"\nport = {port}\ntls_name = "localhost"\n'
    )


def build_setup(root: Path, ca: trustme.CA, port: int, settings: Settings) -> GatewaySetup:
    """The trial's gateway files: the harness's setup, gmail.com routed, frequent checkpoints."""
    setup = make_setup(root, ca, receiver_port=port, delivery_extra=insecure_route(port))
    text = setup.config_path.read_text()
    audit = '[audit]\npath = "audit"\n'
    setup.config_path.write_text(
        text.replace(audit, f"{audit}checkpoint_every = {settings.checkpoint_every}\n")
    )
    return setup


async def run_trial(
    root: Path,
    ca: trustme.CA,
    server_context: ssl.SSLContext,
    *,
    seed: int,
    settings: Settings = Settings(),
) -> TrialResult:
    """Run one crash trial under `root` (an empty folder) and return what it found."""
    started = time.monotonic()
    result = TrialResult(seed=seed, root=root)
    server, port, handler = await start_receiver(tls_context=server_context)
    controls = len(CONTROL_DIRS)
    try:
        setup = build_setup(root, ca, port, settings)
        await _trial(setup, handler, random.Random(seed), settings, result)
    finally:
        await stop_receiver(server, handler)
        for folder in CONTROL_DIRS[controls:]:
            shutil.rmtree(folder, ignore_errors=True)
        del CONTROL_DIRS[controls:]
        result.seconds = time.monotonic() - started
    return result


def _tail(process: GatewayProcess, lines: int = 15) -> str:
    return "".join(process.output[-lines:])


async def _trial(
    setup: GatewaySetup,
    handler: Receiver,
    rng: random.Random,
    settings: Settings,
    result: TrialResult,
) -> None:
    first = GatewayProcess(setup)
    try:
        smtp_port = await asyncio.to_thread(first.start)
    except RuntimeError as exc:
        result.violations.append(f"first start failed: {exc}")
        return
    load = Load(smtp_port, setup.client_context, rng, settings)
    result.sent = load.sent
    try:
        load.start()
        await _wait_for_kill_moment(load, rng, settings, result)
        if first.proc is not None and first.proc.poll() is not None:
            result.violations.append(
                f"the gateway exited by itself ({first.proc.returncode}):\n{_tail(first)}"
            )
    finally:
        if first.proc is not None and first.proc.poll() is None:
            first.proc.send_signal(signal.SIGKILL)
        load.stopping.set()  # sessions in flight run on into the dead socket; no new ones
        await asyncio.to_thread(first.finish)
        await asyncio.to_thread(load.stop)
    if any(t.is_alive() for t in load.threads):
        result.violations.append("a client thread did not stop")
    # Let the receiver finish whatever the killed gateway had already handed to the kernel:
    # every message received up to here came from the first gateway.
    await asyncio.sleep(0.2)
    before_restart = len(handler.messages)
    second = GatewayProcess(setup)
    try:
        try:
            await asyncio.to_thread(second.start)
        except RuntimeError as exc:
            result.violations.append(f"restart failed (no manual repair): {exc}")
            return
        await _wait_for_deliveries(handler, load.sent, settings.deliver_timeout)
        status = await asyncio.to_thread(second.terminate, settings.stop_timeout)
        if status != 0:
            result.violations.append(f"restarted gateway exited {status}:\n{_tail(second)}")
    finally:
        second.kill()
    result.recovered = sum(e.get("event") == "spool_recovered" for e in second.events())
    check(setup, list(load.sent), list(handler.messages), before_restart, result)


async def _wait_for_kill_moment(
    load: Load, rng: random.Random, settings: Settings, result: TrialResult
) -> None:
    """Wait for a random number of ACKs (plus jitter) or a random delay, capped."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    if rng.random() < 0.5:
        target = rng.randint(0, settings.max_kill_acks)
        jitter = rng.uniform(0, 0.03)
        while load.acks < target and loop.time() - begin < settings.kill_cap:
            await asyncio.sleep(0.002)
        await asyncio.sleep(jitter)
        result.kill = f"after {load.acks} ACKs (target {target})"
    else:
        delay = rng.uniform(0, settings.max_kill_delay)
        await asyncio.sleep(delay)
        result.kill = f"after {delay:.3f}s ({load.acks} ACKs)"


def _tokens(messages: list[Received]) -> set[str]:
    return {t.decode() for m in messages for t in TOKEN.findall(m.content)}


async def _wait_for_deliveries(handler: Receiver, sent: list[Sent], timeout: float) -> None:
    """Wait (bounded) until every ACKed secure message has arrived; `check` says what did not."""
    expected = {s.token for s in sent if s.outcome == ACK and s.secure}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and not expected <= _tokens(handler.messages):
        await asyncio.sleep(0.05)


# -- the invariants ---------------------------------------------------------------------------


def original_part(content: bytes) -> bytes | None:
    """The message as the client sent it: the gateway's three fields taken off the top."""
    rest = without_dkim(content)
    if not rest.startswith(DECISION):
        return None
    rest = rest.split(b"\r\n", 1)[1]
    if not rest.startswith(b"Received: "):
        return None
    lines = rest.split(b"\r\n")
    end = 1
    while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
        end += 1
    return b"\r\n".join(lines[end:])


def decision_ref(content: bytes) -> str | None:
    """The reference in the delivered decision field."""
    rest = without_dkim(content)
    if not rest.startswith(DECISION):
        return None
    found = REF.match(rest[len(DECISION) :].decode("ascii", "replace"))
    return found.group() if found else None


def _first_difference(a: bytes, b: bytes) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def check(
    setup: GatewaySetup,
    sent: list[Sent],
    messages: list[Received],
    before_restart: int,
    result: TrialResult,
) -> None:
    """Check every invariant; append each violation found to `result.violations`."""
    bad = result.violations
    by_token = {s.token: s for s in sent}
    copies: dict[str, list[tuple[int, Received]]] = {}
    for index, message in enumerate(messages):
        domains = {r.rpartition("@")[2].lower() for r in message.rcpt_tos}
        if domains & INSECURE_DOMAINS:
            bad.append(f"delivered to an insecure domain: {sorted(domains)}")
        if message.tls_version is None:
            bad.append("a message was delivered without TLS")
        found = {t.decode() for t in TOKEN.findall(message.content)}
        if message.mail_from in {"", "<>"}:
            result.notices += 1
            if found:
                bad.append(f"a notice carries message content ({sorted(found)})")
            continue
        if len(found) != 1:
            bad.append(f"delivered message #{index} has {len(found)} tokens")
            continue
        copies.setdefault(found.pop(), []).append((index, message))
    result.copies = sum(len(c) for c in copies.values())

    records, first_run = _audit(setup, result)
    refs_events: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if isinstance(record.get("ref"), str):
            refs_events.setdefault(record["ref"], []).append(record)
    first_run_delivered = {
        r["ref"]
        for r in first_run
        if r.get("event") == "delivered" and isinstance(r.get("ref"), str)
    }

    for token, got in copies.items():
        item = by_token.get(token)
        if item is None:
            bad.append(f"{token}: delivered but never sent")
            continue
        if not item.secure:
            bad.append(f"{token}: insecure message delivered (outcome {item.outcome})")
        if item.outcome in {NACK, NOSEND}:
            bad.append(f"{token}: delivered but answered {item.outcome} ({item.code})")
        if item.refusable:
            bad.append(f"{token}: a message with a bare LF was delivered")
        if item.outcome == UNK:
            result.unk_delivered += 1
        for _, message in got:
            original = original_part(message.content)
            if original != item.body:
                where = -1 if original is None else _first_difference(original, item.body)
                length = -1 if original is None else len(original)
                bad.append(
                    f"{token}: body differs (got {length} bytes, sent {len(item.body)},"
                    f" first difference at {where})"
                )
            ref = decision_ref(message.content)
            if item.outcome == ACK and ref != item.ref:
                bad.append(f"{token}: delivered as {ref}, accepted as {item.ref}")
        if len(got) > 1:
            ref = decision_ref(got[0][1].content) or ""
            kind = _explain(
                ref, [i for i, _ in got], before_restart, refs_events, first_run_delivered
            )
            if kind is None:
                result.unexplained += 1
                bad.append(f"{token} ({ref}): {len(got)} copies, unexplained duplicate")
            else:
                result.duplicates[kind] += 1

    for item in sent:
        if item.refusable and item.outcome == ACK:
            bad.append(f"{item.token}: a message with a bare LF was answered 250")
        if item.outcome != ACK:
            continue
        if item.secure and item.token not in copies:
            bad.append(f"{item.token} ({item.ref}): answered 250 but never delivered")
        if item.ref is None:
            bad.append(f"{item.token}: 250 without a reference")
            continue
        accepted = sum(r.get("event") == "accepted" for r in refs_events.get(item.ref, []))
        if records and accepted != 1:
            bad.append(f"{item.ref}: {accepted} accepted records for a 250")
        held = setup.root / "spool" / "held" / f"{item.ref}.meta"
        if not item.secure and not held.exists():
            bad.append(f"{item.ref}: held message not in held/")
    _check_files(setup, bad)


def _audit(
    setup: GatewaySetup, result: TrialResult
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Verify the log; return its records and those of the killed gateway's run."""
    folder = setup.config.audit_path
    try:
        report = verify(folder, load_public_key(setup.root / "keys" / "audit-signing.pub"))
    except GatewayError as exc:
        result.violations.append(f"audit log cannot be verified: {exc}")
        return [], []
    if not report.ok:
        result.violations.append(f"audit log does not verify: {report.problem}")
    result.repaired = len(report.repaired)
    try:
        records = list(read_records(folder))
    except GatewayError as exc:
        result.violations.append(f"audit log cannot be read: {exc}")
        return [], []
    # Each start records `policy_loaded`: the last one opens the restarted gateway's run.
    starts = [i for i, r in enumerate(records) if r.get("event") == "policy_loaded"]
    if len(starts) != 2:
        result.violations.append(f"{len(starts)} policy_loaded records, expected 2")
    return records, records[: starts[-1]] if starts else records


def _explain(
    ref: str,
    indices: list[int],
    before_restart: int,
    events: dict[str, list[dict[str, Any]]],
    first_run_delivered: set[str],
) -> str | None:
    """Why a message arrived more than once, or None if nothing explains it."""
    ambiguous = sum(
        r.get("event") == "deferred" and r.get("reason") == "ambiguous" for r in events.get(ref, [])
    ) + unfinished_attempts(events.get(ref, []))
    early = sum(i < before_restart for i in indices)
    crash_window = early >= 1 and len(indices) - early >= 1
    extra = len(indices) - 1
    if extra > ambiguous + crash_window:
        return None
    if extra > ambiguous:  # the crash window is needed to explain one copy
        return "crash_window_recorded" if ref in first_run_delivered else "crash_window_unrecorded"
    return "ambiguous_in_log"


def _check_files(setup: GatewaySetup, bad: list[str]) -> None:
    spool = setup.root / "spool"
    leftovers = sorted(p.name for p in (spool / "tmp").iterdir())
    if leftovers:
        bad.append(f"left in spool/tmp: {leftovers}")
    for folder in (setup.config.audit_path, setup.root / "keys"):
        temporary = sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))
        if temporary:
            bad.append(f"temporary files left in {folder.name}/: {temporary}")
    data = {p.name.removesuffix(".msg") for p in (spool / "data").iterdir()}
    metas: set[str] = set()
    for state in ("active", "deferred", "held"):
        with contextlib.suppress(FileNotFoundError):
            metas |= {p.name.removesuffix(".meta") for p in (spool / state).iterdir()}
    if data != metas:
        bad.append(
            f"spool inconsistent: content without envelope {sorted(data - metas)},"
            f" envelope without content {sorted(metas - data)}"
        )


def unfinished_attempts(records: list[dict[str, Any]]) -> int:
    """Attempts with no outcome recorded before the next attempt: the gateway died mid-way."""
    count, open_attempt = 0, False
    for record in records:
        event = record.get("event")
        if event == "attempt":
            count += open_attempt
            open_attempt = True
        elif event in ("delivered", "deferred", "bounced"):
            open_attempt = False
    return count + open_attempt
