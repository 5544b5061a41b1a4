"""The daemon's in-memory queue index follows the spool without reading it again."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime

from gateway.queue_entry import State
from gateway.queue_index import QueueIndex
from gateway.spool import Spool
from tests.test_spool import KEY, make_entry, make_ref


def stored(spool: Spool, n: int, state: State = State.ACTIVE):
    """Commit the n-th test entry with a small body; return it."""
    ref = make_ref(n)
    writer = spool.new_message(ref)
    writer.write(b"body")
    entry = replace(make_entry(ref, state), size=writer.size, digest=writer.digest)
    spool.commit(writer, entry)
    return spool.load(ref)


def test_index_loads_existing_entries_and_follows_changes(tmp_path):
    """Entries present at load, later commits, state changes and removals are all reflected."""
    spool = Spool(tmp_path / "spool", KEY)
    spool.prepare(process_start=time.time())
    first = stored(spool, 1, State.HELD)
    index = QueueIndex(spool)
    assert index.load() == 1
    second = stored(spool, 2)
    assert [r["ref"] for r in index.select()] == [first.ref, second.ref]
    spool.save(replace(second, state=State.DEFERRED))
    assert [r["state"] for r in index.select()] == ["held", "deferred"]
    spool.remove(first.ref)
    assert [r["ref"] for r in index.select()] == [second.ref]


def test_index_filters_by_state_domain_and_age(tmp_path):
    """select() filters by state, by sender or recipient domain, and by age."""
    spool = Spool(tmp_path / "spool", KEY)
    spool.prepare(process_start=time.time())
    index = QueueIndex(spool)
    index.load()
    held = stored(spool, 3, State.HELD)
    active = stored(spool, 4)
    assert [r["ref"] for r in index.select(state=State.HELD)] == [held.ref]
    assert [r["ref"] for r in index.select(domain="example.org")] == [held.ref, active.ref]
    assert index.select(domain="nhs.net") == []
    assert index.select(older_than=datetime(2026, 1, 1, tzinfo=UTC)) == []
    assert len(index.select(older_than=datetime(2027, 1, 1, tzinfo=UTC))) == 2


def test_summaries_carry_no_address(tmp_path):
    """A summary holds domains and codes only: no address, no local part."""
    spool = Spool(tmp_path / "spool", KEY)
    spool.prepare(process_start=time.time())
    index = QueueIndex(spool)
    index.load()
    stored(spool, 5, State.HELD)
    text = repr(index.select())
    assert "canary" not in text
    assert "@" not in text
