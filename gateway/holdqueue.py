"""The hold queue's admin actions: release, reject, expire. Each is recorded before it acts.

Held mail is where people's judgement comes in (Golden Rule 7): every action writes its audit
record first (`released`, `rejected`, `expired`, with the acting Unix user and the admin's
words), then changes the spool. Actions on one daemon are serialised, and each checks that the
message is still held, so a second release of the same message is a clear error, never a
second delivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from gateway import records
from gateway.audit import AuditLog
from gateway.errors import GatewayError
from gateway.logconfig import get_logger
from gateway.metrics import Metrics
from gateway.notices import NoticeKind
from gateway.notifier import Notifier
from gateway.policy import Policy
from gateway.queue_entry import QueueEntry, State
from gateway.spool import Spool

log = get_logger("holdqueue")

MAX_REASON = 500


class HoldQueueError(GatewayError):
    """An admin action cannot be done; the message says why, in one line."""


def check_reason(reason: str) -> str:
    """The admin's words, checked: required, one line of printable text, at most 500 chars."""
    text = reason.strip()
    if not text:
        raise HoldQueueError("give a --reason: it is recorded in the transfer log")
    if len(text) > MAX_REASON or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise HoldQueueError(f"--reason must be one line of at most {MAX_REASON} characters")
    return text


class HoldQueue:
    """Release, reject and expire held messages."""

    def __init__(
        self,
        *,
        spool: Spool,
        audit: AuditLog,
        policy: Callable[[], Policy],
        notifier: Notifier,
        enqueue: Callable[[QueueEntry], None],
        clock: Callable[[], datetime],
        max_age: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.spool = spool
        self.audit = audit
        self.policy = policy
        self.notifier = notifier
        self.enqueue = enqueue
        self.clock = clock
        self.max_age = timedelta(seconds=max_age)
        self._lock = asyncio.Lock()

    async def _held(self, ref: str) -> QueueEntry:
        if not await asyncio.to_thread(self.spool.contains, ref):
            raise HoldQueueError(f"{ref} is not in the queue (already released, rejected or sent?)")
        entry = await asyncio.to_thread(self.spool.load, ref)
        if entry.state is not State.HELD:
            raise HoldQueueError(f"{ref} is not held (it is {entry.state}): nothing to do")
        if entry.notice:
            raise HoldQueueError(f"{ref} is a notice, not a held message")
        return entry

    async def release(
        self, ref: str, *, actor: str, reason: str, drop_insecure: bool = False
    ) -> dict[str, Any]:
        """Release a held message: only if every recipient is secure now, or drop the others."""
        reason = check_reason(reason)
        async with self._lock:
            entry = await self._held(ref)
            policy = self.policy()
            today = self.clock().date()
            pending = entry.pending()
            insecure = [r for r in pending if not policy.classify(r.domain, today).secure]
            if insecure and not drop_insecure:
                domains = ", ".join(sorted({r.domain for r in insecure}))
                raise HoldQueueError(
                    f"{ref} still has recipients in domains that are not secure: {domains} "
                    "(add --drop-insecure to drop them and send to the rest)"
                )
            if len(insecure) == len(pending):
                raise HoldQueueError(f"{ref} has no secure recipient left: reject it instead")
            await self.audit.append(
                records.released(
                    ref=ref,
                    actor=actor,
                    reason=reason,
                    recipients_dropped=[r.pseudonym for r in insecure],
                )
            )
            now = self.clock()
            dropped = {r.address for r in insecure}
            released = replace(
                entry,
                state=State.ACTIVE,
                recipients=tuple(
                    replace(r, status="dropped") if r.address in dropped else r
                    for r in entry.recipients
                ),
                verdict="release",
                policy=policy.version,
                decided_at=now,
                next_attempt=now,
            )
            saved = await asyncio.to_thread(self.spool.save, released)
        log.info("message_released", ref=ref, actor=actor, dropped=len(insecure))
        self.metrics.admin_action("released")
        self.enqueue(saved)
        if insecure:
            await self.notifier.notify(
                entry,
                NoticeKind.RELEASED_PARTLY,
                concerned=insecure,
                reasons=[f"insecure_domain:{r.domain}" for r in insecure],
                admin_reason=reason,
            )
        return {
            "ref": ref,
            "state": "active",
            "dropped_domains": sorted({r.domain for r in insecure}),
        }

    async def reject(self, ref: str, *, actor: str, reason: str) -> dict[str, Any]:
        """Reject a held message: recorded, sender told, content purged."""
        reason = check_reason(reason)
        async with self._lock:
            entry = await self._held(ref)
            await self.audit.append(records.rejected(ref=ref, actor=actor, reason=reason))
            await self.notifier.notify(
                entry,
                NoticeKind.REJECTED,
                concerned=entry.pending(),
                reasons=list(entry.reasons),
                admin_reason=reason,
            )
            await asyncio.to_thread(self.spool.remove, ref)
        log.info("message_rejected", ref=ref, actor=actor)
        self.metrics.admin_action("rejected")
        return {"ref": ref, "state": "rejected"}

    async def expire_due(self, held: list[dict[str, Any]]) -> list[str]:
        """Reject, with a notice, every held message older than `[hold] max_age`."""
        cutoff = (self.clock() - self.max_age).strftime("%Y-%m-%dT%H:%M:%SZ")
        expired = []
        for row in held:
            if row["received"] >= cutoff or row.get("notice"):
                continue
            async with self._lock:
                try:
                    entry = await self._held(str(row["ref"]))
                except HoldQueueError:
                    continue  # released or rejected meanwhile
                await self.audit.append(records.expired(ref=entry.ref, reason="hold_max_age"))
                await self.notifier.notify(
                    entry,
                    NoticeKind.EXPIRED,
                    concerned=entry.pending(),
                    reasons=list(entry.reasons),
                )
                await asyncio.to_thread(self.spool.remove, entry.ref)
            log.info("message_expired", ref=entry.ref, reason="hold_max_age")
            self.metrics.admin_action("expired")
            expired.append(entry.ref)
        return expired

    def releasable(self, held: list[dict[str, Any]]) -> list[str]:
        """Held messages whose every pending recipient domain is secure under today's policy."""
        policy = self.policy()
        today = self.clock().date()
        secure: dict[str, bool] = {}  # each distinct domain is classified once

        def is_secure(domain: str) -> bool:
            if domain not in secure:
                secure[domain] = policy.classify(domain, today).secure
            return secure[domain]

        return [
            str(row["ref"])
            for row in held
            if not row.get("notice")
            and row["recipient_domains"]
            and all(is_secure(d) for d in row["recipient_domains"])
        ]
