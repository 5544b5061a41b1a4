"""What happens to a message the SMTP layer has read: decide, spool, record, answer.

`Inbound` is shared by every SMTP session. It holds the parts a session needs (config, the
policy in force, spool, audit log, keys) and performs the two steps that combine decisions with
I/O: refusing a recipient by policy (audit `refused`, then 550) and accepting a message (decide,
commit to the spool, audit `accepted`, then 250). The 250 is only returned once both the spool
files and the audit record are durable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway import records, replies
from gateway.addresses import Address
from gateway.audit import AuditLog
from gateway.config import Client, Config
from gateway.decision import Decision, Verdict, decide
from gateway.errors import AuditError, SpoolError
from gateway.logconfig import get_logger
from gateway.metrics import Metrics
from gateway.notices import NoticeKind
from gateway.notifier import Notifier
from gateway.policy import DomainVerdict, Policy
from gateway.pseudonym import pseudonym
from gateway.queue_entry import QueueEntry, Recipient, State
from gateway.smtp_auth import Authenticator
from gateway.spool import MessageWriter, Spool

log = get_logger("inbound")

SPACE_CHECK_EVERY = 0.5  # seconds between two looks at the spool's free space


def utc_now() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Transaction:
    """One mail transaction's envelope as the SMTP layer collected it."""

    client: Client
    sender: Address
    recipients: tuple[Address, ...]
    smtputf8: bool


class Inbound:
    """Shared state and the accept/refuse steps for all inbound SMTP sessions."""

    def __init__(
        self,
        *,
        config: Config,
        policy: Callable[[], Policy],
        spool: Spool,
        audit: AuditLog,
        pseudonym_key: bytes,
        on_accepted: Callable[[QueueEntry], None],
        clock: Callable[[], datetime] = utc_now,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.config = config
        self.policy = policy
        self.spool = spool
        self.audit = audit
        self.pseudonym_key = pseudonym_key
        self.on_accepted = on_accepted
        self.clock = clock
        self.connections = 0
        self.per_address: collections.Counter[str] = collections.Counter()
        self.accepting = True
        self.authenticator = Authenticator()
        self.notifier: Notifier | None = None  # set by the daemon
        self.sessions: set[Any] = set()  # the GatewaySMTP sessions in flight
        self._idle = asyncio.Event()  # set whenever no session is open
        self._background: set[asyncio.Task[str | None]] = set()
        self._space_ok = False  # False: look at the file system at the next MAIL
        self._space_checked_at = 0.0

    async def drain(self, grace: float) -> int:
        """Stop accepting; tell idle sessions 421; wait up to `grace` for busy ones to finish.

        Returns how many sessions were still open when the grace period ran out.
        """
        self.accepting = False
        for session in list(self.sessions):
            session.shut()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # A session that was told 421 and is closing needs no more time: a TLS close can wait
        # long for the peer's close_notify, and the peer has all it needs.
        while self.connections and loop.time() < deadline:
            if all(session.finished for session in self.sessions):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 0.1)
        left = sum(not session.finished for session in self.sessions)
        for session in list(self.sessions):
            session.abort()
        return left

    def admit(self, peer_ip: str) -> bool:
        """Count a new session in, unless the total or per-address limit is reached."""
        server = self.config.server
        if self.connections >= server.max_connections:
            return False
        if self.per_address[peer_ip] >= server.max_connections_per_address:
            return False
        self.connections += 1
        self.per_address[peer_ip] += 1
        self._idle.clear()
        return True

    def release(self, peer_ip: str) -> None:
        """Count a session out."""
        self.connections -= 1
        if not self.connections:
            self._idle.set()
        self.per_address[peer_ip] -= 1
        if self.per_address[peer_ip] <= 0:
            del self.per_address[peer_ip]

    def pseudonym(self, address: Address) -> str:
        """The keyed pseudonym of an address."""
        return pseudonym(self.pseudonym_key, address.normalised)

    def classify(self, domain: str) -> tuple[Policy, DomainVerdict]:
        """The policy in force and its verdict on `domain` now."""
        policy = self.policy()
        return policy, policy.classify(domain, self.clock().date())

    def has_space(self) -> bool:
        """False when the spool's file system has less than 1.5 x the largest message free.

        Asked at every MAIL. While there is room, the file system is asked at most every
        SPACE_CHECK_EVERY seconds, and again after any spool write failed; while there is
        not, at every MAIL, so mail flows again as soon as space is freed (statvfs of a local
        folder does not block).
        """
        now = time.monotonic()
        if not self._space_ok or now - self._space_checked_at >= SPACE_CHECK_EVERY:
            try:
                stats = os.statvfs(self.spool.root)
            except OSError:
                self._space_ok = False
            else:
                free = stats.f_bavail * stats.f_frsize
                self._space_ok = free >= self.config.server.max_message_size * 3 // 2
            self._space_checked_at = now
        return self._space_ok

    def recheck_space(self) -> None:
        """A spool write failed (perhaps for want of space): look again at the next MAIL."""
        self._space_ok = False

    async def refuse_recipient(
        self,
        client: Client,
        sender: Address,
        recipient: Address,
        policy: Policy,
        verdict: DomainVerdict,
    ) -> str:
        """Record a recipient refused by policy and return the 550 reply (or 451 if unrecorded)."""
        reason = verdict.reason or "insecure_domain"
        event = records.refused(
            client=client.name,
            policy=policy.version,
            sender_domain=sender.domain,
            sender_pseudonym=self.pseudonym(sender),
            recipient_domain=recipient.domain,
            recipient_pseudonym=self.pseudonym(recipient),
            reasons=[f"{reason}:{recipient.domain}"],
        )
        try:
            await self.audit.append(event)
        except AuditError:
            log.exception("audit_write_failed", step="refused")
            self.metrics.message_refused("spool_failed")
            return replies.INTERNAL_ERROR
        self.metrics.message_refused(reason)
        log.info(
            "recipient_refused",
            client=client.name,
            domain=recipient.domain,
            reason=reason,
            rule=verdict.rule,
        )
        return replies.recipient_refused(reason, recipient.domain)

    def new_entry(
        self, ref: str, txn: Transaction, decision: Decision, reader_size: int, digest: str
    ) -> QueueEntry:
        """The spool entry for an accepted message (pure given its inputs)."""
        now = decision.at
        return QueueEntry(
            ref=ref,
            state=State.ACTIVE if decision.verdict is Verdict.RELEASE else State.HELD,
            received=now,
            client=txn.client.name,
            sender=txn.sender.normalised,
            sender_domain=txn.sender.domain,
            sender_pseudonym=self.pseudonym(txn.sender),
            recipients=tuple(
                Recipient(address=r.normalised, domain=r.domain, pseudonym=self.pseudonym(r))
                for r in txn.recipients
            ),
            verdict=str(decision.verdict),
            reasons=decision.reasons,
            policy=decision.policy_version,
            decided_at=now,
            size=reader_size,
            digest=digest,
            smtputf8=txn.smtputf8,
            next_attempt=now if decision.verdict is Verdict.RELEASE else None,
        )

    async def accept(
        self,
        ref: str,
        txn: Transaction,
        writer: MessageWriter,
        *,
        size: int,
        digest: str,
        marking: str | None,
        purpose_header: bytes | None = None,
        tail: bytes = b"",
    ) -> str:
        """Decide, make the message and its record durable, and return the SMTP reply.

        `tail` is the content not yet handed to `writer`: written in the same thread call
        that commits, so a small message costs a session one trip to a thread.
        """
        policy = self.policy()
        decision = decide([r.domain for r in txn.recipients], policy, self.clock(), ref)
        entry = self.new_entry(ref, txn, decision, size, digest)
        event = records.accepted(
            ref=ref,
            client=txn.client.name,
            verdict=str(decision.verdict),
            reasons=list(decision.reasons),
            policy=decision.policy_version,
            sender_domain=entry.sender_domain,
            sender_pseudonym=entry.sender_pseudonym,
            recipients=[
                (v.domain, r.pseudonym, v.secure, v.rule)
                for v, r in zip(decision.recipients, entry.recipients, strict=True)
            ],
            digest=digest,
            size=size,
            marking=marking,
            purpose=policy.purpose(purpose_header),
        )
        failure = await asyncio.to_thread(self._commit, writer, entry, event, tail)
        if failure is not None:
            step, exc = failure
            self.recheck_space()
            if step == "accepted":
                log.error("audit_write_failed", ref=ref, step=step, exc_info=exc)
            else:
                log.error("spool_write_failed", ref=ref, step=step, exc_info=exc)
            self.metrics.message_refused("spool_failed")
            return replies.SPOOL_FAILED
        self.metrics.message_accepted(str(decision.verdict))
        log.info(
            "message_accepted",
            ref=ref,
            client=txn.client.name,
            verdict=str(decision.verdict),
            reasons=list(decision.reasons),
            sender_domain=entry.sender_domain,
            recipient_domains=sorted({r.domain for r in entry.recipients}),
            size=size,
            policy=policy.short_version,
        )
        if decision.verdict is Verdict.RELEASE:
            self.on_accepted(entry)
            return replies.queued(ref)
        self._notify_held(entry, decision)
        return replies.held(ref, decision.reply_detail())

    def _commit(
        self, writer: MessageWriter, entry: QueueEntry, event: records.AuditEvent, tail: bytes
    ) -> tuple[str, Exception] | None:
        """Stage, record, publish (in a worker thread); the failed step and its error, if any.

        Order matters (invariant 2 and Golden Rule 7): content and envelope durable under
        tmp/, then the decision durable in the transfer log, then published into the queue,
        then (the caller's) 250. A crash before the record leaves only temporary files; a crash
        after it leaves a recorded message that the client never saw accepted, and retries.
        """
        try:
            if tail:
                writer.write(tail)
            staged = self.spool.stage(writer, entry)
        except SpoolError as exc:
            writer.abort()
            return ("stage", exc)
        try:
            self.audit.append_blocking(event)
        except AuditError as exc:
            # No record, no acceptance: drop the staged files and let the client retry.
            self.spool.discard(staged)
            return ("accepted", exc)
        try:
            self.spool.publish(staged)
        except SpoolError as exc:
            return ("publish", exc)
        return None

    def _notify_held(self, entry: QueueEntry, decision: Decision) -> None:
        """Queue the held notice in the background: the 250 does not wait for it."""
        if self.notifier is None:
            return
        insecure = {v.domain for v in decision.recipients if not v.secure}
        task = asyncio.get_running_loop().create_task(
            self.notifier.notify(
                entry,
                NoticeKind.HELD,
                concerned=[r for r in entry.recipients if r.domain in insecure],
                reasons=list(decision.reasons),
            )
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)
