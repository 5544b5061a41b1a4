"""Notices to senders, queued in the spool like any message.

A notice (RFC 3464 delivery-status, built by `notices.build_notice`) is stored encrypted in the
spool as an entry of its own, marked `notice`, addressed to the original envelope sender and
sent from the null path `<>`. The delivery worker takes it like any other message: verified TLS
only, over the routes, with retries, surviving restarts. It carries no content of the original
message, so the secure-domain policy does not apply to it; and a notice never causes another.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from datetime import datetime

from gateway.config import Config
from gateway.errors import SpoolError
from gateway.logconfig import get_logger
from gateway.notices import NoticeKind, build_notice
from gateway.queue_entry import QueueEntry, Recipient, State
from gateway.reference import new_reference
from gateway.spool import Spool

log = get_logger("notifier")


class Notifier:
    """Builds notices and puts them in the spool for delivery."""

    def __init__(
        self,
        *,
        config: Config,
        spool: Spool,
        enqueue: Callable[[QueueEntry], None],
        clock: Callable[[], datetime],
    ) -> None:
        self.config = config
        self.spool = spool
        self.enqueue = enqueue
        self.clock = clock

    async def notify(
        self,
        entry: QueueEntry,
        kind: NoticeKind,
        *,
        concerned: Sequence[Recipient],
        reasons: Sequence[str],
        admin_reason: str | None = None,
    ) -> str | None:
        """Queue a notice about `entry` to its sender; return the notice's reference, if any."""
        if not self.config.notices_enabled or entry.notice or not entry.sender or not concerned:
            return None
        now = self.clock()
        hostname = self.config.server.hostname
        notice = build_notice(
            entry,
            kind,
            concerned=concerned,
            reasons=reasons,
            now=now,
            from_address=self.config.notices_from,
            reporting_mta=hostname,
            message_id_domain=hostname,
            admin_reason=admin_reason,
        )
        if notice is None:
            return None
        ref = new_reference(now)
        queued = QueueEntry(
            ref=ref,
            state=State.ACTIVE,
            received=now,
            client="gateway",
            sender="",
            sender_domain="",
            sender_pseudonym="",
            recipients=(
                Recipient(
                    address=entry.sender,
                    domain=entry.sender_domain,
                    pseudonym=entry.sender_pseudonym,
                ),
            ),
            verdict="release",
            reasons=(f"notice:{kind}", f"about:{entry.ref}"),
            policy=entry.policy,
            decided_at=now,
            size=len(notice.message),
            digest="sha256:" + hashlib.sha256(notice.message).hexdigest(),
            notice=True,
            smtputf8=not entry.sender.isascii(),
            next_attempt=now,
        )
        try:
            await asyncio.to_thread(self._store, queued, notice.message)
        except SpoolError:
            log.exception("notice_not_queued", ref=entry.ref, kind=str(kind))
            return None
        log.info("notice_queued", ref=entry.ref, notice=ref, kind=str(kind))
        self.enqueue(queued)
        return ref

    def _store(self, entry: QueueEntry, message: bytes) -> None:
        writer = self.spool.new_message(entry.ref)
        writer.write(message)
        self.spool.commit(writer, entry)
