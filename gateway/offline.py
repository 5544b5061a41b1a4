"""Queue commands when no daemon is running: the same actions, straight on the spool.

The CLI asks the daemon over the control socket when it runs. When it does not, the command
takes the spool's lock (so a daemon starting meanwhile waits), opens the transfer log as its
one writer, and does the same thing the daemon would: record first, then act. A released
message is left active for the daemon's next start; notices wait in the spool likewise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
from datetime import UTC, datetime
from typing import Any

from gateway.admin import AdminService
from gateway.audit import AuditLog
from gateway.config import Config
from gateway.errors import GatewayError, SpoolError
from gateway.holdqueue import HoldQueue
from gateway.keys import load_keys
from gateway.notifier import Notifier
from gateway.policy import load_policy
from gateway.queue_entry import QueueEntry
from gateway.queue_index import QueueIndex
from gateway.spool import Spool


def current_user() -> str:
    """The Unix user running this command."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid:{os.getuid()}"


def _now() -> datetime:
    return datetime.now(UTC)


def _ignore(_entry: QueueEntry) -> None:
    """No worker runs: whatever becomes active waits for the daemon's next start."""


async def run(config: Config, command: str, request: dict[str, Any]) -> Any:
    """Do one queue command directly on the spool, under the spool's lock."""
    if not config.spool_path.is_dir():
        raise GatewayError(f"{config.spool_path}: spool folder not found")
    keys = await asyncio.to_thread(load_keys, config.keys_path)
    policy = await asyncio.to_thread(load_policy, config.policy_path)
    spool = Spool(config.spool_path, keys.spool_key)
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(spool.locked(wait=False))
    except SpoolError as exc:
        raise GatewayError(
            f"the spool is in use (is the daemon running? its control socket "
            f"{config.control_socket} does not answer): {exc}"
        ) from exc
    with lock:
        index = QueueIndex(spool)
        await asyncio.to_thread(index.load)
        audit = AuditLog.from_config(config.audit, keys.signing_key)
        mutating = command in ("queue.release", "queue.reject")
        if mutating:
            await audit.start()
        try:
            notifier = Notifier(config=config, spool=spool, enqueue=_ignore, clock=_now)
            admin = AdminService(
                spool=spool,
                index=index,
                holdqueue=HoldQueue(
                    spool=spool,
                    audit=audit,
                    policy=lambda: policy,
                    notifier=notifier,
                    enqueue=_ignore,
                    clock=_now,
                    max_age=config.hold_max_age,
                ),
                clock=_now,
                expiry_every=60.0,
            )
            handler = admin.handlers()[command]
            return await handler(request, current_user())
        finally:
            if mutating:
                await audit.close()
