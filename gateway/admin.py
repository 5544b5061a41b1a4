"""The admin's side of the running daemon: queue requests over the control socket, expiry.

Each handler takes a control request and the acting Unix user (from SO_PEERCRED) and returns
a JSON-ready result. Listing answers from the in-memory `QueueIndex`, so it stays fast with a
hundred thousand held messages; actions go through the `HoldQueue`, which records first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from gateway.control import Handler
from gateway.errors import GatewayError
from gateway.holdqueue import HoldQueue
from gateway.logconfig import get_logger
from gateway.queue_entry import State
from gateway.queue_index import QueueIndex
from gateway.spool import Spool

log = get_logger("admin")


class AdminService:
    """Queue listing, inspection, release, reject and the hold queue's expiry."""

    def __init__(
        self,
        *,
        spool: Spool,
        index: QueueIndex,
        holdqueue: HoldQueue,
        clock: Callable[[], datetime],
        expiry_every: float,
    ) -> None:
        self.spool = spool
        self.index = index
        self.holdqueue = holdqueue
        self.clock = clock
        self.expiry_every = expiry_every
        self._expiry: asyncio.Task[None] | None = None

    def handlers(self) -> dict[str, Handler]:
        """The control commands this service answers."""
        return {
            "queue.list": self.list_queue,
            "queue.show": self.show,
            "queue.release": self.release,
            "queue.reject": self.reject,
        }

    async def _ready(self) -> None:
        await asyncio.to_thread(self.index.loaded.wait)

    async def held(self) -> list[dict[str, Any]]:
        """Summaries of every held message."""
        await self._ready()
        return self.index.select(state=State.HELD)

    async def list_queue(self, request: dict[str, Any], _actor: str) -> list[dict[str, Any]]:
        """Summaries, filtered by state, domain and age; held ones say if they are releasable."""
        await self._ready()
        state = _state(request.get("state"))
        older = request.get("older_than")
        older_than = None
        if older is not None:
            if not isinstance(older, int) or older < 0:
                raise GatewayError("--older-than takes a number of seconds")
            older_than = self.clock() - timedelta(seconds=older)
        domain = request.get("domain")

        def select() -> list[dict[str, Any]]:
            rows = self.index.select(
                state=state,
                domain=domain if isinstance(domain, str) else None,
                older_than=older_than,
            )
            releasable = set(self.holdqueue.releasable([r for r in rows if r["state"] == "held"]))
            return [r | {"releasable": r["ref"] in releasable} for r in rows]

        # Off the event loop: a list of 100,000 held messages must not stall accepting mail.
        return await asyncio.to_thread(select)

    async def show(self, request: dict[str, Any], _actor: str) -> dict[str, Any]:
        """One message's details."""
        ref = _ref(request)
        if not await asyncio.to_thread(self.spool.contains, ref):
            raise GatewayError(f"{ref} is not in the queue")
        entry = await asyncio.to_thread(self.spool.load, ref)
        return entry.details()

    async def release(self, request: dict[str, Any], actor: str) -> dict[str, Any]:
        """`gateway queue release`."""
        return await self.holdqueue.release(
            _ref(request),
            actor=actor,
            reason=str(request.get("reason") or ""),
            drop_insecure=bool(request.get("drop_insecure")),
        )

    async def reject(self, request: dict[str, Any], actor: str) -> dict[str, Any]:
        """`gateway queue reject`."""
        return await self.holdqueue.reject(
            _ref(request), actor=actor, reason=str(request.get("reason") or "")
        )

    async def release_secure(self, policy_version: str) -> list[str]:
        """Release every held message whose recipients are all secure now (after a reload)."""
        released = []
        for ref in self.holdqueue.releasable(await self.held()):
            with contextlib.suppress(GatewayError):
                await self.holdqueue.release(
                    ref,
                    actor="gateway",
                    reason="release_when_secure: every recipient is secure under policy "
                    + policy_version[:16],
                )
                released.append(ref)
        return released

    def start_expiry(self) -> None:
        """Check the hold queue for expired messages now and then, in the background."""
        self._expiry = asyncio.get_running_loop().create_task(self._expire_forever())

    async def stop(self) -> None:
        """Stop the expiry checks."""
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry

    async def _expire_forever(self) -> None:
        while True:
            try:
                await self.holdqueue.expire_due(await self.held())
            except GatewayError:
                log.exception("hold_expiry_failed")
            await asyncio.sleep(self.expiry_every)


def _state(raw: object) -> State | None:
    if raw is None:
        return None
    try:
        return State(str(raw))
    except ValueError as exc:
        raise GatewayError(f"unknown state {str(raw)[:20]}: held, deferred or active") from exc


def _ref(request: dict[str, Any]) -> str:
    ref = request.get("ref")
    if not isinstance(ref, str) or not ref:
        raise GatewayError("a reference (SG-...) is needed")
    return ref
