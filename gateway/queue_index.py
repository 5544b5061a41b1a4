"""The daemon's in-memory index of the spool: fast `queue list` without decrypting every file.

Each spool entry is stored encrypted; reading 100,000 of them takes seconds. The daemon, the
spool's only writer while it runs, keeps one small summary per message (state, time, domains,
reasons: nothing personal) and keeps it current through the spool's change observer. It is
loaded once at start, off the event loop.
"""

from __future__ import annotations

import collections
import gc
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from gateway.queue_entry import QueueEntry, State
from gateway.spool import Spool


class QueueIndex:
    """Summaries of every queued message, by reference."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._summaries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.loaded = threading.Event()
        spool.observers.append(self.changed)

    def load(self) -> int:
        """Read every entry once (blocking: call from a thread); return how many."""
        for state in State:
            for entry in self._spool.entries(state):
                with self._lock:
                    # A change observed while loading is newer than what was read.
                    self._summaries.setdefault(entry.ref, entry.summary())
        # A big index is long-lived: keep the garbage collector from rescanning it under load.
        gc.freeze()
        self.loaded.set()
        return len(self._summaries)

    def changed(self, ref: str, entry: QueueEntry | None) -> None:
        """Observer for the spool: keep one summary per message that is still queued."""
        with self._lock:
            if entry is None:
                self._summaries.pop(ref, None)
            else:
                self._summaries[ref] = entry.summary()

    def select(
        self,
        *,
        state: State | None = None,
        domain: str | None = None,
        older_than: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Summaries in reference (time) order, filtered by state, domain and age."""
        with self._lock:
            rows = list(self._summaries.values())
        return sorted(_filter(rows, state, domain, older_than), key=lambda r: str(r["ref"]))

    def counts(self) -> dict[str, int]:
        """How many messages are in each state."""
        with self._lock:
            return dict(collections.Counter(str(r["state"]) for r in self._summaries.values()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._summaries)


def _filter(
    rows: Iterable[dict[str, Any]],
    state: State | None,
    domain: str | None,
    older_than: datetime | None,
) -> Iterable[dict[str, Any]]:
    cutoff = older_than.strftime("%Y-%m-%dT%H:%M:%SZ") if older_than else None
    for row in rows:
        if state is not None and row["state"] != state.value:
            continue
        if (
            domain is not None
            and domain != row["sender_domain"]
            and domain not in row["recipient_domains"]
        ):
            continue
        if cutoff is not None and row["received"] >= cutoff:
            continue
        yield row
