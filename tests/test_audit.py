import asyncio
import hashlib
import itertools
import json
import stat
import sys
import tempfile
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import audit, records
from gateway.audit import AuditLog, canonical_line, read_records, records_for, verify_chain
from gateway.errors import AuditError, AuditIntegrityError
from gateway.records import AuditEvent

GENESIS = "0" * 64
FIRST = "transfer-000000000001.jsonl"


def _event(number: int) -> AuditEvent:
    """Return a small distinct event about message SG-<number>."""
    return records.held(ref=f"SG-{number}", reasons=["insecure_domain:gmail.com"], policy="ab")


async def _write(folder: Path, count: int) -> list[dict]:
    """Append count events one after another and close the log."""
    log = AuditLog(folder)
    await log.start()
    try:
        return [await log.append(_event(number)) for number in range(count)]
    finally:
        await log.close()


def _lines(folder: Path) -> list[bytes]:
    """Return the log file's bytes split at line feeds (a last empty piece means it ends in LF)."""
    return (folder / FIRST).read_bytes().split(b"\n")


def _save(folder: Path, lines: list[bytes]) -> None:
    """Replace the log file with the given pieces joined by line feeds."""
    (folder / FIRST).write_bytes(b"\n".join(lines))


async def test_concurrent_appends_form_one_contiguous_verified_chain(tmp_path):
    """1000 concurrent appends get seq 1..1000 exactly once and the chain verifies."""
    log = AuditLog(tmp_path)
    await log.start()
    written = await asyncio.gather(*(log.append(_event(n)) for n in range(1000)))
    await log.close()
    assert sorted(record["seq"] for record in written) == list(range(1, 1001))
    assert verify_chain(tmp_path) == 1000
    assert log.last_seq == 1000
    on_disk = list(read_records(tmp_path))
    assert sorted(written, key=lambda record: record["seq"]) == on_disk
    assert on_disk[0]["prev"] == GENESIS


async def test_concurrent_appends_are_group_committed(tmp_path):
    """500 concurrent appends are made durable in fewer commits than records."""
    log = AuditLog(tmp_path)
    await log.start()
    await asyncio.gather(*(log.append(_event(n)) for n in range(500)))
    await log.close()
    assert 1 <= log.batches_committed < 500


async def test_record_format_and_timestamp(tmp_path):
    """A record is seq, ts (UTC, ms), event, prev, ref, then fields, canonically encoded."""
    moment = datetime(2026, 11, 25, 4, 42, 30, 123999, tzinfo=timezone(timedelta(hours=1)))
    log = AuditLog(tmp_path, clock=lambda: moment)
    await log.start()
    record = await log.append(_event(1))
    await log.close()
    assert list(record) == ["seq", "ts", "event", "prev", "ref", "reasons", "policy"]
    assert record["ts"] == "2026-11-25T03:42:30.123Z"
    expected = (
        b'{"seq":1,"ts":"2026-11-25T03:42:30.123Z","event":"held","prev":"' + GENESIS.encode()
        + b'","ref":"SG-1","reasons":["insecure_domain:gmail.com"],"policy":"ab"}\n'
    )  # fmt: skip
    assert (tmp_path / FIRST).read_bytes() == expected
    assert canonical_line(record) + b"\n" == expected


async def test_prev_is_sha256_of_previous_line(tmp_path):
    """Each record's prev is the SHA-256 hex of the previous line's exact bytes."""
    await _write(tmp_path, 3)
    lines = _lines(tmp_path)
    for before, line in itertools.pairwise(lines[:3]):
        assert json.loads(line)["prev"] == hashlib.sha256(before).hexdigest()


async def test_non_ascii_is_escaped(tmp_path):
    """Canonical lines are ASCII: other characters are written as JSON escapes."""
    log = AuditLog(tmp_path)
    await log.start()
    await log.append(records.policy_rejected(error="bad entry bücher.example"))
    await log.close()
    assert b"b\\u00fccher" in (tmp_path / FIRST).read_bytes()
    assert verify_chain(tmp_path) == 1


async def test_restart_continues_seq_and_chain(tmp_path):
    """A log reopened after a clean stop continues seq and chain, also across a long file."""
    await _write(tmp_path, 700)  # larger than one backwards-read chunk
    await _write(tmp_path, 5)
    assert verify_chain(tmp_path) == 705
    assert [record["seq"] for record in read_records(tmp_path)] == list(range(1, 706))


async def test_folder_and_file_are_private(tmp_path):
    """The log folder is created 0700 and the file 0600."""
    folder = tmp_path / "audit"
    await _write(folder, 1)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / FIRST).stat().st_mode) == 0o600


async def test_torn_last_line_is_sealed_off_by_a_repair_record(tmp_path):
    """After a crash mid-write, start ends the torn line and seals it with log_repaired."""
    await _write(tmp_path, 3)
    torn = b'{"seq":4,"ts":"2026-11-25T03:4'
    with (tmp_path / FIRST).open("ab") as handle:
        handle.write(torn)
    with pytest.raises(AuditIntegrityError, match=r"000001.jsonl:4: incomplete") as caught:
        list(read_records(tmp_path))
    assert caught.value.seq == 4
    with pytest.raises(AuditIntegrityError, match="torn last line") as caught:
        verify_chain(tmp_path)
    assert caught.value.seq == 4
    third = _lines(tmp_path)[2]
    log = AuditLog(tmp_path)
    await log.start()
    assert (log.last_seq, log.repaired_seq) == (4, 4)
    record = await log.append(_event(9))
    await log.close()
    assert record["seq"] == 5
    lines = _lines(tmp_path)
    assert lines[3] == torn  # history is not rewritten
    repair = json.loads(lines[4])
    assert repair["event"] == "log_repaired"
    assert repair["prev"] == hashlib.sha256(third).hexdigest()
    assert repair["torn_bytes"] == len(torn)
    assert repair["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert verify_chain(tmp_path) == 5
    assert [r["seq"] for r in read_records(tmp_path)] == [1, 2, 3, 4, 5]


async def test_repeated_crashes_are_each_sealed_and_verify(tmp_path):
    """Two crashes, each repaired at the next start, leave a log that verifies."""
    await _write(tmp_path, 2)
    for fragment in (b'{"seq":3,"t', b'{"se'):
        with (tmp_path / FIRST).open("ab") as handle:
            handle.write(fragment)
        log = AuditLog(tmp_path)
        await log.start()
        await log.close()
    log = AuditLog(tmp_path)
    await log.start()
    record = await log.append(_event(3))
    await log.close()
    assert record["seq"] == 5
    assert verify_chain(tmp_path) == 5


async def test_torn_first_line_is_sealed_from_genesis(tmp_path):
    """A crash during the very first write is sealed by a log_repaired record with seq 1."""
    tmp_path.joinpath(FIRST).write_bytes(b'{"seq":1,"ts"')
    log = AuditLog(tmp_path)
    await log.start()
    record = await log.append(_event(1))
    await log.close()
    repair = json.loads(_lines(tmp_path)[1])
    assert (repair["seq"], repair["prev"], repair["event"]) == (1, GENESIS, "log_repaired")
    assert record["seq"] == 2
    assert verify_chain(tmp_path) == 2


async def test_edited_field_names_the_edited_record(tmp_path):
    """Changing a field of record 5 makes verify_chain name seq 5."""
    await _write(tmp_path, 10)
    lines = _lines(tmp_path)
    lines[4] = lines[4].replace(b'"policy":"ab"', b'"policy":"cd"')
    _save(tmp_path, lines)
    with pytest.raises(AuditIntegrityError, match="seq 5 was altered") as caught:
        verify_chain(tmp_path)
    assert caught.value.seq == 5


async def test_deleted_line_names_the_missing_seq(tmp_path):
    """Deleting record 5 makes verify_chain name seq 5."""
    await _write(tmp_path, 10)
    lines = _lines(tmp_path)
    del lines[4]
    _save(tmp_path, lines)
    with pytest.raises(AuditIntegrityError, match="missing") as caught:
        verify_chain(tmp_path)
    assert caught.value.seq == 5


async def test_swapped_lines_name_the_first_moved_seq(tmp_path):
    """Swapping records 5 and 6 makes verify_chain name seq 5."""
    await _write(tmp_path, 10)
    lines = _lines(tmp_path)
    lines[4], lines[5] = lines[5], lines[4]
    _save(tmp_path, lines)
    with pytest.raises(AuditIntegrityError) as caught:
        verify_chain(tmp_path)
    assert caught.value.seq == 5


async def test_non_canonical_line_is_named(tmp_path):
    """Re-encoding a record with other spacing is detected at that record."""
    await _write(tmp_path, 3)
    lines = _lines(tmp_path)
    lines[2] = json.dumps(json.loads(lines[2])).encode()
    _save(tmp_path, lines)
    with pytest.raises(AuditIntegrityError, match="not a record") as caught:
        verify_chain(tmp_path)
    assert caught.value.seq == 3


async def test_first_record_must_chain_from_genesis(tmp_path):
    """A first record whose prev is not 64 zeros fails at seq 1."""
    await _write(tmp_path, 2)
    lines = _lines(tmp_path)
    lines[0] = lines[0].replace(GENESIS.encode(), b"1" * 64)
    _save(tmp_path, lines)
    with pytest.raises(AuditIntegrityError) as caught:
        verify_chain(tmp_path)
    assert caught.value.seq == 1


async def test_records_for_returns_one_messages_records(tmp_path):
    """records_for selects the records about one reference, in order."""
    log = AuditLog(tmp_path)
    await log.start()
    await log.append(_event(1))
    await log.append(records.policy_loaded(policy="ab", source="policies"))
    await log.append(_event(2))
    await log.append(
        records.delivery("deferred", ref="SG-1", recipients=[], host=None, tls=None, response=None)
    )
    await log.close()
    assert [record["seq"] for record in records_for(tmp_path, "SG-1")] == [1, 4]


async def test_empty_and_missing_logs(tmp_path):
    """An empty folder verifies as seq 0; a missing folder is an AuditError."""
    assert verify_chain(tmp_path) == 0
    with pytest.raises(AuditError, match="no transfer log folder"):
        verify_chain(tmp_path / "absent")


async def test_append_needs_an_open_log(tmp_path):
    """Appending before start or after close raises AuditError."""
    log = AuditLog(tmp_path)
    with pytest.raises(AuditError, match="not open"):
        await log.append(_event(1))
    await log.start()
    await log.close()
    with pytest.raises(AuditError, match="not open"):
        await log.append(_event(1))


async def test_second_writer_is_refused(tmp_path):
    """Only one writer at a time may hold a log folder."""
    first = AuditLog(tmp_path)
    await first.start()
    with pytest.raises(AuditError, match="another writer"):
        await AuditLog(tmp_path).start()
    await first.close()


async def test_unserialisable_event_fails_alone(tmp_path):
    """A record that cannot be encoded fails by itself and does not break the log."""
    log = AuditLog(tmp_path)
    await log.start()
    with pytest.raises(AuditError, match="refused"):
        await log.append(AuditEvent("odd", None, {"value": {1, 2}}))
    record = await log.append(_event(1))
    await log.close()
    assert record["seq"] == 1
    assert verify_chain(tmp_path) == 1


FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, resource, sys
    from pathlib import Path
    from gateway.audit import AuditLog
    from gateway.errors import AuditError
    from gateway.records import policy_rejected

    async def main(folder):
        log = AuditLog(folder)
        await log.start()
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))
        outcomes = []
        for _ in range(40):
            batch = [log.append(policy_rejected(error="x" * 60)) for _ in range(3)]
            for result in await asyncio.gather(*batch, return_exceptions=True):
                ok = isinstance(result, dict)
                assert ok or isinstance(result, AuditError), result
                outcomes.append(result["seq"] if ok else str(result))
        await log.close()
        print(json.dumps(outcomes))

    asyncio.run(main(Path(sys.argv[1])))
    """
)


async def test_failed_write_breaks_the_log_until_restart(tmp_path):
    """Past a file size limit (EFBIG) appends fail and keep failing; a restart recovers the tail."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        stdout, _ = await child.communicate()
    assert child.returncode == 0
    outcomes = json.loads(stdout)
    written = [outcome for outcome in outcomes if isinstance(outcome, int)]
    failures = outcomes[len(written) :]
    assert written == list(range(1, len(written) + 1))
    assert failures
    assert all(isinstance(outcome, str) and "EFBIG" in outcome for outcome in failures)
    assert (tmp_path / FIRST).stat().st_size == 4000
    complete = _lines(tmp_path)[:-1]
    assert len(complete) >= len(written)  # a failed batch may have reached the disk in part
    log = AuditLog(tmp_path)
    await log.start()
    assert log.last_seq == len(complete) + 1
    assert log.repaired_seq == len(complete) + 1
    record = await log.append(_event(1))
    await log.close()
    repair = json.loads(_lines(tmp_path)[len(complete) + 1])
    assert repair["prev"] == hashlib.sha256(complete[-1]).hexdigest()
    assert record["seq"] == len(complete) + 2
    assert verify_chain(tmp_path) == len(complete) + 2


def test_canonical_line_keeps_key_order():
    """canonical_line is compact ASCII JSON in the record's own key order."""
    assert canonical_line({"seq": 2, "ts": "t", "a": "é"}) == b'{"seq":2,"ts":"t","a":"\\u00e9"}'


def test_format_ts_refuses_naive_times():
    """The clock must give aware datetimes; a naive one would be ambiguous."""
    with pytest.raises(ValueError, match="aware"):
        audit.format_ts(datetime(2026, 1, 1))  # noqa: DTZ001
    assert audit.format_ts(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00.000Z"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=30))
def test_any_texts_round_trip_through_a_verified_chain(texts):
    """Whatever text the fields hold, records read back equal and the chain verifies."""

    async def scenario(folder: Path) -> list[dict]:
        log = AuditLog(folder)
        await log.start()
        written = await asyncio.gather(
            *(log.append(records.policy_rejected(error=text)) for text in texts)
        )
        await log.close()
        return sorted(written, key=lambda record: record["seq"])

    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        written = asyncio.run(scenario(folder))
        assert list(read_records(folder)) == written
        assert verify_chain(folder) == len(texts)
        assert sorted(record["error"] for record in written) == sorted(texts)


async def test_append_blocking_from_threads_joins_the_chain(tmp_path):
    """Worker threads append without the event loop; the records share one contiguous chain."""
    log = AuditLog(tmp_path)
    await log.start()
    from_threads = asyncio.gather(
        *(asyncio.to_thread(log.append_blocking, _event(n)) for n in range(50))
    )
    from_loop = asyncio.gather(*(log.append(_event(n)) for n in range(50, 100)))
    written = [*await from_threads, *await from_loop]
    await log.close()
    assert sorted(record["seq"] for record in written) == list(range(1, 101))
    assert verify_chain(tmp_path) == 100
    with pytest.raises(AuditError, match="not open"):
        log.append_blocking(_event(1))


async def test_append_blocking_reports_a_refused_record(tmp_path):
    """A record that cannot be encoded fails in the calling thread, and the log goes on."""
    log = AuditLog(tmp_path)
    await log.start()
    with pytest.raises(AuditError, match="refused"):
        await asyncio.to_thread(log.append_blocking, AuditEvent("odd", None, {"value": {1, 2}}))
    record = await asyncio.to_thread(log.append_blocking, _event(1))
    await log.close()
    assert record["seq"] == 1
