"""The delivery worker: spool -> policy check -> deliver -> record. The one orchestrator.

The worker keeps a heap of released messages by their next attempt time. For each due message
it checks the policy in force *now* (invariant 1: a domain removed from the policy meanwhile gets
nothing: the message moves to the hold queue), reads the content from the encrypted spool, adds
the decision header, and delivers each route's recipients over verified TLS. Every outcome is an
audit record written before the spool changes; a delivered or bounced message's content is
deleted at once (retain no longer than necessary).

The content is never held whole. One pass in a thread (`_prepare`) loads the entry, verifies
every chunk, keeps the header section, hashes the body and signs; each route's delivery then
reads the content again from the spool as a `SpoolStream`, a block at a time, in a thread. A
message that fits in one block (most do) is kept from that pass instead and sent from memory.
Memory per delivery is a block and the header section, whatever the size of the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import dkim, records, schedule
from gateway.audit import AuditLog
from gateway.config import DeliveryConfig, DkimConfig, Route
from gateway.delivery import Attempt, Deliverer, MemoryStream, OutgoingMessage
from gateway.errors import AuditError, DeliveryError, PermanentDeliveryError, SpoolError
from gateway.headers import decision_field
from gateway.logconfig import get_logger
from gateway.metrics import Metrics
from gateway.notices import NoticeKind
from gateway.notifier import Notifier
from gateway.policy import Policy
from gateway.queue_entry import QueueEntry, Recipient, State
from gateway.spool import READ_BLOCK, Spool

log = get_logger("worker")


class DecisionSigner:
    """Signs released messages with DKIM, the decision header among the signed fields."""

    def __init__(self, key: Ed25519PrivateKey, config: DkimConfig) -> None:
        self.key = key
        self.config = config

    def signature(self, ref: str, scan: dkim.MessageScan) -> bytes:
        """The DKIM-Signature field for a scanned message; b"" (send unsigned) if it cannot be."""
        try:
            return dkim.sign_scan(
                scan, key=self.key, domain=self.config.domain, selector=self.config.selector
            )
        except ValueError:
            # A client header line that is not a field cannot be signed; say so, send as is.
            log.warning("message_unsigned", ref=ref, reason="malformed_header")
            return b""


class SpoolStream:
    """The content of a spooled message as a delivery's `ContentStream`, read in a thread.

    Each step decrypts one block (`Spool.content_blocks`) in a thread; a lock makes a close
    wait for a read still running there (after a cancelled delivery), so the file is never
    closed under it.
    """

    def __init__(self, spool: Spool, ref: str) -> None:
        self._blocks = spool.content_blocks(ref)
        self._lock = threading.Lock()

    def __aiter__(self) -> SpoolStream:
        return self

    async def __anext__(self) -> bytes:
        block = await asyncio.to_thread(self._next)
        if block is None:
            raise StopAsyncIteration
        return block

    async def aclose(self) -> None:
        """Close the content file (in a thread, after any read in progress)."""
        await asyncio.to_thread(self._close)

    def _next(self) -> bytes | None:
        with self._lock:
            return next(self._blocks, None)

    def _close(self) -> None:
        with self._lock:
            self._blocks.close()


@dataclass(frozen=True)
class _Prepared:
    """What an attempt needs before it can send: all from one pass over the content."""

    entry: QueueEntry
    decision: bytes  # the decision field ("" for a notice)
    header: bytes  # the header section as it will be sent (SMTPUTF8 is decided on it)
    size: int  # of the content alone
    signature: bytes  # the DKIM-Signature field, or "" (unsigned)
    content: bytes | None  # the whole content when it fits in one block: no second read


def _prepare(spool: Spool, ref: str, signer: DecisionSigner | None) -> _Prepared | None:
    """Load the entry and read the content once (blocking); None if there is nothing to send.

    Every chunk is verified on the way, so damaged content is a SpoolError before anything
    is recorded or sent. The decision field is scanned first, as it will be sent. The
    signature is made here too, in the same trip to a thread; a message the policy holds
    after all has cost one signature for nothing.
    """
    if not spool.contains(ref):
        return None  # finished or removed meanwhile
    entry = spool.load(ref)
    if entry.state is State.HELD or not entry.pending():
        return None
    if entry.notice:
        # A notice carries no content of any message: no decision header, no signature.
        decision, signer = b"", None
    else:
        decision = decision_field(ref=ref, policy_version=entry.policy, at=entry.decided_at)
    scan = dkim.MessageScan(hash_body=signer is not None)
    scan.update(decision)
    kept: list[bytes] | None = []
    size = 0
    with contextlib.closing(spool.open_content(ref)) as chunks:
        for chunk in chunks:
            scan.update(chunk)
            size += len(chunk)
            if kept is not None:
                kept.append(chunk)
                if size > READ_BLOCK:
                    kept = None  # too big to keep: each delivery streams it from the spool
    scan.finish()
    signature = b"" if signer is None else signer.signature(ref, scan)
    content = None if kept is None else b"".join(kept)
    return _Prepared(entry, decision, signature + scan.header, size, signature, content)


_LOG_EVENTS = {
    "delivered": "message_delivered",
    "deferred": "delivery_deferred",
    "bounced": "message_bounced",
}

Outcome = tuple[str, Sequence[Recipient], Attempt | None, DeliveryError | None]


class Worker:
    """Delivers released messages from the spool, retrying on the configured schedule."""

    def __init__(
        self,
        *,
        spool: Spool,
        audit: AuditLog,
        deliverer: Deliverer,
        delivery: DeliveryConfig,
        policy: Callable[[], Policy],
        clock: Callable[[], datetime],
        signer: DecisionSigner | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.signer = signer
        self.spool = spool
        self.audit = audit
        self.deliverer = deliverer
        self.delivery = delivery
        self.policy = policy
        self.clock = clock
        self._heap: list[tuple[datetime, str]] = []
        self._queued: set[str] = set()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(delivery.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self.notifier: Notifier | None = None  # set by the daemon once the notifier exists

    # -- scheduling --------------------------------------------------------------------------

    def enqueue(self, entry: QueueEntry) -> None:
        """Schedule a released message for its next attempt."""
        if entry.ref in self._queued:
            return
        due = entry.next_attempt or self.clock()
        heapq.heappush(self._heap, (due, entry.ref))
        self._queued.add(entry.ref)
        self._wake.set()

    async def recover(self) -> int:
        """Schedule every active and deferred message found in the spool; return how many."""
        count = 0
        for state in (State.ACTIVE, State.DEFERRED):
            entries = await asyncio.to_thread(_entries, self.spool, state)
            for entry in entries:
                self.enqueue(entry)
                count += 1
        return count

    def start(self) -> None:
        """Run the scheduling loop in the background."""
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="worker")

    async def stop(self, grace: float = 0.0) -> None:
        """Stop scheduling; let attempts in flight finish within `grace`, then cancel them.

        A cancelled attempt leaves its spool entry as it was: it is made again after restart.
        """
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._tasks and grace > 0:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.deliverer.close()

    @property
    def queued(self) -> int:
        """Messages waiting for an attempt or in flight."""
        return len(self._queued)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            while self._heap and self._heap[0][0] <= now:
                _, ref = heapq.heappop(self._heap)
                await self._slots.acquire()
                task = asyncio.get_running_loop().create_task(self._attempt(ref))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            timeout = None
            if self._heap:
                timeout = max(0.0, (self._heap[0][0] - self.clock()).total_seconds())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _attempt(self, ref: str) -> None:
        try:
            await self.attempt(ref)
        except (SpoolError, AuditError):
            log.exception("delivery_attempt_failed", ref=ref)
            # Try again later rather than lose track of it.
            self._queued.discard(ref)
            heapq.heappush(self._heap, (self.clock() + timedelta(seconds=60), ref))
            self._queued.add(ref)
        finally:
            self._slots.release()
            self._wake.set()

    # -- one attempt -------------------------------------------------------------------------

    async def attempt(self, ref: str) -> None:
        """Make one delivery attempt for every pending recipient of message `ref`."""
        self._queued.discard(ref)
        prepared = await asyncio.to_thread(_prepare, self.spool, ref, self.signer)
        if prepared is None:
            return
        entry = prepared.entry
        if not entry.notice:
            # The policy in force now decides (invariant 1); it does not apply to a notice.
            policy = self.policy()
            today = self.clock().date()
            pending = entry.pending()
            verdicts = [policy.classify(r.domain, today) for r in pending]
            if not all(v.secure for v in verdicts):
                insecure = [r for r, v in zip(pending, verdicts, strict=True) if not v.secure]
                reasons = [f"{v.reason}:{v.domain}" for v in verdicts if not v.secure]
                await self._hold(entry, policy, insecure, reasons)
                return
        top = prepared.signature + prepared.decision
        content = prepared.content
        message = OutgoingMessage(
            top=top,
            header=prepared.header,
            size=len(top) + prepared.size,
            open_content=(
                (lambda: SpoolStream(self.spool, ref))
                if content is None
                else (lambda: MemoryStream(content))
            ),
        )
        # Recipients whose routes lead to the same server (host, port, certificate name) go in
        # one transaction, as Postfix groups by next hop.
        groups: dict[tuple[str, int, str] | None, tuple[Route | None, list[Recipient]]] = {}
        for recipient in entry.pending():
            route = self.delivery.route_for(recipient.domain)
            key = (route.host, route.port, route.tls_name) if route else None
            groups.setdefault(key, (route, []))[1].append(recipient)
        outcomes = await asyncio.gather(
            *(self._deliver_group(entry, route, group, message) for route, group in groups.values())
        )
        await self._settle(entry, outcomes)

    async def _deliver_group(
        self,
        entry: QueueEntry,
        route: Route | None,
        group: list[Recipient],
        message: OutgoingMessage,
    ) -> Outcome:
        if route is None:
            return ("no_route", group, None, None)
        host = f"{route.host}:{route.port}"
        if not entry.notice:
            # Recorded before the message can reach the recipient: an attempt with no outcome
            # after it (the gateway died) explains a second copy after the restart.
            await self.audit.append(
                records.attempt(ref=entry.ref, recipients=[r.pseudonym for r in group], host=host)
            )
        try:
            attempt = await self.deliverer.deliver(
                route, entry.sender, [r.address for r in group], message
            )
        except DeliveryError as exc:
            return (host, group, None, exc)
        return (host, group, attempt, None)

    async def _settle(self, entry: QueueEntry, outcomes: Sequence[Outcome]) -> None:
        status: dict[str, str] = {}
        deferred_reason: list[str] = []
        bounced: list[tuple[Recipient, str]] = []
        for host, group, attempt, error in outcomes:
            by_address = {r.address: r for r in group}
            if attempt is not None:
                tls = _tls_fields(attempt)
                done = [by_address[o.address] for o in attempt.outcomes if o.delivered]
                perm = [by_address[o.address] for o in attempt.outcomes if o.permanent]
                temp = [r for r in group if r not in done and r not in perm]
                await self._record("delivered", entry, done, host, tls, attempt.response, None)
                await self._record("bounced", entry, perm, host, tls, attempt.response, "rejected")
                reason = "ambiguous" if attempt.ambiguous else "recipient_deferred"
                await self._record("deferred", entry, temp, host, tls, attempt.response, reason)
                status.update({r.address: "delivered" for r in done})
                status.update({r.address: "bounced" for r in perm})
                bounced += [(r, f"rejected:{r.domain}") for r in perm]
                if temp:
                    deferred_reason.append(f"{reason} at {host}")
            elif isinstance(error, PermanentDeliveryError):
                await self._record("bounced", entry, group, host, None, error.code, error.kind)
                status.update({r.address: "bounced" for r in group})
                bounced += [(r, f"{error.kind}:{r.domain}") for r in group]
            else:
                kind = error.kind if error is not None else "no_route"
                code = error.code if error is not None else None
                await self._record("deferred", entry, group, host, None, code, kind)
                deferred_reason.append(f"{kind} at {host}")
        recipients = tuple(
            replace(r, status=status.get(r.address, r.status)) for r in entry.recipients
        )
        updated = replace(entry, recipients=recipients, attempts=entry.attempts + 1)
        await self._reschedule(updated, "; ".join(deferred_reason) or None)
        if bounced:
            await self._notify(
                entry, NoticeKind.BOUNCED, [r for r, _ in bounced], [why for _, why in bounced]
            )

    async def _reschedule(self, entry: QueueEntry, last_error: str | None) -> None:
        pending = entry.pending()
        if not pending:
            await asyncio.to_thread(self.spool.remove, entry.ref)
            log.info("message_finished", ref=entry.ref, attempts=entry.attempts)
            return
        now = self.clock()
        due = schedule.next_attempt(
            attempts=entry.attempts,
            received=entry.received,
            now=now,
            schedule=self.delivery.retry_schedule,
            max_lifetime=self.delivery.max_queue_lifetime,
        )
        if due is None:
            await self._record("bounced", entry, pending, None, None, None, "queue_lifetime")
            await asyncio.to_thread(self.spool.remove, entry.ref)
            log.warning("message_expired", ref=entry.ref, recipients=len(pending))
            await self._notify(entry, NoticeKind.BOUNCED, pending, ["queue_lifetime"])
            return
        saved = await asyncio.to_thread(
            self.spool.save,
            replace(entry, state=State.DEFERRED, next_attempt=due, last_error=last_error),
        )
        log.info("message_deferred", ref=entry.ref, next_attempt=due.isoformat(), reason=last_error)
        self.enqueue(saved)

    async def _notify(
        self,
        entry: QueueEntry,
        kind: NoticeKind,
        concerned: Sequence[Recipient],
        reasons: Sequence[str],
    ) -> None:
        if self.notifier is not None:
            await self.notifier.notify(entry, kind, concerned=concerned, reasons=reasons)

    async def _hold(
        self,
        entry: QueueEntry,
        policy: Policy,
        insecure: Sequence[Recipient],
        reasons: list[str],
    ) -> None:
        await self.audit.append(records.held(ref=entry.ref, reasons=reasons, policy=policy.version))
        await asyncio.to_thread(
            self.spool.save,
            replace(
                entry,
                state=State.HELD,
                reasons=tuple(reasons),
                policy=policy.version,
                next_attempt=None,
            ),
        )
        log.warning("message_held_at_delivery", ref=entry.ref, reasons=reasons)
        await self._notify(entry, NoticeKind.HELD, insecure, reasons)

    async def _record(  # noqa: PLR0917  (one call per outcome kind, all fields positional)
        self,
        event: str,
        entry: QueueEntry,
        group: Sequence[Recipient],
        host: str | None,
        tls: dict[str, object] | None,
        response: int | None,
        reason: str | None,
    ) -> None:
        if not group:
            return
        latency = (self.clock() - entry.received).total_seconds()
        self.metrics.delivery(event, reason, latency if event == "delivered" else None, len(group))
        if entry.notice:
            # Notices are not safeguarding mail: their outcomes go to the operational log only.
            log.info(
                "notice_outcome",
                outcome=event,
                ref=entry.ref,
                host=host,
                response=response,
                reason=reason,
            )
            return
        await self.audit.append(
            records.delivery(
                event,  # type: ignore[arg-type]
                ref=entry.ref,
                recipients=[r.pseudonym for r in group],
                host=host,
                tls=tls,
                response=response,
                reason=reason,
            )
        )
        log.info(
            _LOG_EVENTS[event],
            ref=entry.ref,
            host=host,
            recipient_domains=sorted({r.domain for r in group}),
            response=response,
            reason=reason,
        )


def _tls_fields(attempt: Attempt) -> dict[str, object] | None:
    if attempt.tls is None:
        return None
    return {
        "version": attempt.tls.version,
        "cipher": attempt.tls.cipher,
        "verified": attempt.tls.verified,
    }


def _entries(spool: Spool, state: State) -> list[QueueEntry]:
    return list(spool.entries(state))
