import asyncio
import csv
import io
import itertools
import json
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import records
from gateway.audit import AuditLog, log_files, read_records
from gateway.audit_query import (
    CSV_COLUMNS,
    Filters,
    csv_row,
    export_csv,
    export_json,
    export_jsonl,
    matches,
    normalise_domain,
    parse_time,
    search,
)
from gateway.errors import AuditError
from gateway.pseudonym import pseudonym
from gateway.records import AuditEvent

KEY = bytes(range(32))
POLICY = "bcd224fe1d0ffb778317b6f8cbf0111e5e80995cc07459ed33239fb45285ec2e"
DIGEST = "sha256:" + "86d0aff7ba5ee70856b22993e8ae6002471bccc5ed55080d6cd2a64a6b4a84f0"
START = datetime(2026, 11, 25, 3, 0, 0, tzinfo=UTC)
ALICE = pseudonym(KEY, "alice@bromley.gcsx.gov.uk")
BOB = pseudonym(KEY, "bob@nhs.net")
CAROL = pseudonym(KEY, "carol@gmail.com")
DAVE = pseudonym(KEY, "dave@nhs.net")
INJECTION = '=HYPERLINK("http://x.invalid","x")'
TLS = {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "verified": True}


def _clock(start: datetime = START, step: timedelta = timedelta(minutes=1)):
    """Return a clock that moves on by step at each call (one call per batch)."""
    ticks = itertools.count()
    return lambda: start + step * next(ticks)


async def _write(folder: Path, events: list[AuditEvent], clock=None) -> list[dict]:
    """Append events one at a time (one batch, one ts each) and close the log."""
    log = AuditLog(folder, clock=clock or _clock())
    await log.start()
    try:
        return [await log.append(event) for event in events]
    finally:
        await log.close()


def _accepted(ref, client, verdict, recipients, *, marking=None, reasons=()):
    """Build an accepted event from alice to (domain, pseudonym, secure) recipients."""
    return records.accepted(
        ref=ref,
        client=client,
        verdict=verdict,
        reasons=list(reasons),
        policy=POLICY,
        sender_domain="bromley.gcsx.gov.uk",
        sender_pseudonym=ALICE,
        recipients=[(d, p, s, d if s else None) for d, p, s in recipients],
        digest=DIGEST,
        size=121,
        marking=marking,
        purpose=None,
    )


def _story() -> list[AuditEvent]:
    """A small day at the gateway, one record a minute from 03:00."""
    return [
        records.policy_loaded(policy=POLICY, source="/etc/gateway/policies"),  # 03:00 seq 1
        _accepted(
            "SG-A", "bromley-council", "release", [("nhs.net", BOB, True)], marking="OFFICIAL"
        ),
        _accepted(  # 03:02 seq 3
            "SG-B",
            "lewisham-council",
            "hold",
            [("nhs.net", BOB, True), ("gmail.com", CAROL, False)],
            marking="OFFICIAL-SENSITIVE [PERSONAL]",
            reasons=["insecure_domain:gmail.com"],
        ),
        records.refused(  # 03:03 seq 4
            client="bromley-council",
            policy=POLICY,
            sender_domain="bromley.gcsx.gov.uk",
            sender_pseudonym=ALICE,
            recipient_domain="gmail.com",
            recipient_pseudonym=CAROL,
            reasons=["insecure_domain:gmail.com"],
        ),
        records.delivery(  # 03:04 seq 5
            "delivered", ref="SG-A", recipients=[BOB], host="mx.nhs.net", tls=TLS, response=250
        ),
        _accepted("SG-C", "bromley-council", "release", [("nhs.net", DAVE, True)]),  # seq 6
        records.delivery(  # 03:06 seq 7
            "deferred",
            ref="SG-C",
            recipients=[DAVE],
            host=None,
            tls=None,
            response=None,
            reason="connect",
        ),
        records.held(ref="SG-C", reasons=["insecure_domain:nhs.net"], policy=POLICY),  # seq 8
        records.policy_rejected(error=INJECTION),  # 03:08 seq 9
    ]


@pytest.fixture
async def story(tmp_path):
    """Write the story to a real transfer log in tmp_path; return (folder, records)."""
    written = await _write(tmp_path, _story())
    return tmp_path, written


def _seqs(folder: Path, **filters) -> list[int]:
    """Return the seqs search finds with these filters."""
    return [record["seq"] for record in search(folder, Filters(**filters))]


def test_no_filters_find_every_record_in_order(story):
    """Without filters, search yields exactly what read_records yields."""
    folder, written = story
    assert written == list(search(folder, Filters()))


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"events": frozenset({"accepted"})}, [2, 3, 6]),
        ({"events": frozenset({"delivered", "deferred"})}, [5, 7]),
        ({"events": frozenset({"released"})}, []),
        ({"verdict": "hold"}, [3]),
        ({"verdict": "release"}, [2, 6]),
        ({"domain": "gmail.com"}, [3, 4]),
        ({"domain": "nhs.net"}, [2, 3, 6]),
        ({"domain": "bromley.gcsx.gov.uk"}, [2, 3, 4, 6]),
        ({"domain": "gcsx.gov.uk"}, []),
        ({"client": "bromley-council"}, [2, 4, 6]),
        ({"client": "lewisham-council"}, [3]),
        ({"marking": "OFFICIAL"}, [2]),
        ({"marking": "OFFICIAL-SENSITIVE [PERSONAL]"}, [3]),
        ({"ref": "SG-C"}, [6, 7, 8]),
        ({"ref": "SG-Z"}, []),
    ],
)
def test_each_filter_alone(story, filters, expected):
    """Each filter alone finds exactly the records it names, in log order."""
    folder, _ = story
    assert expected == _seqs(folder, **filters)


def test_filters_combine_as_and(story):
    """Several filters given together find only records that match all of them."""
    folder, _ = story
    assert _seqs(folder, domain="nhs.net", client="bromley-council") == [2, 6]
    assert _seqs(folder, domain="gmail.com", events=frozenset({"refused"})) == [4]
    assert _seqs(folder, verdict="release", since=START + timedelta(minutes=3), pseudonym=DAVE) == [
        6
    ]
    assert _seqs(folder, verdict="hold", client="bromley-council") == []


def test_address_pseudonym_finds_its_records_and_nothing_else(story):
    """A pseudonym finds the accepted, refused and delivery records of that address only."""
    folder, _ = story
    assert _seqs(folder, pseudonym=BOB) == [2, 3, 5]
    assert _seqs(folder, pseudonym=CAROL) == [3, 4]
    assert _seqs(folder, pseudonym=DAVE) == [6, 7]
    assert _seqs(folder, pseudonym=ALICE) == [2, 3, 4, 6]
    assert _seqs(folder, pseudonym=pseudonym(KEY, "Bob@nhs.net")) == []
    assert _seqs(folder, pseudonym=pseudonym(b"another key", "bob@nhs.net")) == []


def test_time_range_includes_since_and_excludes_until(story):
    """`since` is inclusive and `until` exclusive, at millisecond precision."""
    folder, _ = story
    at = START + timedelta(minutes=2)
    assert _seqs(folder, since=at, until=at + timedelta(minutes=2)) == [3, 4]
    assert _seqs(folder, since=at, until=at + timedelta(milliseconds=1)) == [3]
    assert _seqs(folder, since=at, until=at + timedelta(microseconds=1)) == [3]
    assert _seqs(folder, since=at + timedelta(microseconds=1), until=at + timedelta(minutes=2)) == [
        4
    ]
    assert _seqs(folder, since=at, until=at) == []
    assert _seqs(folder, until=at) == [1, 2]
    assert _seqs(folder, since=START + timedelta(minutes=7)) == [8, 9]


def test_time_range_accepts_any_offset(story):
    """Bounds given in another time zone mean the same moments as in UTC."""
    folder, _ = story
    paris = timezone(timedelta(hours=1))
    since = datetime(2026, 11, 25, 4, 2, tzinfo=paris)
    assert _seqs(folder, since=since, until=since + timedelta(minutes=2)) == [3, 4]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25", datetime(2026, 11, 25, tzinfo=UTC)),
        ("2026-11-25T03:00", datetime(2026, 11, 25, 3, tzinfo=UTC)),
        ("2026-11-25 03:00:07", datetime(2026, 11, 25, 3, 0, 7, tzinfo=UTC)),
        ("2026-11-25T03:00:07Z", datetime(2026, 11, 25, 3, 0, 7, tzinfo=UTC)),
        ("2026-11-25t03:00:07.5z", datetime(2026, 11, 25, 3, 0, 7, 500000, tzinfo=UTC)),
        ("2026-11-25T03:00:07.123456789Z", datetime(2026, 11, 25, 3, 0, 7, 123456, tzinfo=UTC)),
        (
            "2026-11-25T04:00:00+01:00",
            datetime(2026, 11, 25, 4, tzinfo=timezone(timedelta(hours=1))),
        ),
    ],
)
def test_parse_time_accepts_dates_times_and_rfc3339(text, expected):
    """Dates, UTC date-times and RFC 3339 with Z or an offset parse to aware datetimes."""
    assert expected == parse_time(text)
    assert parse_time(text).utcoffset() is not None


@pytest.mark.parametrize(
    "text",
    ["", "yesterday", "25/11/2026", "20261125", "2026-W48", "2026-02-30", "2026-11-25T25:00"],
)
def test_parse_time_refuses_other_forms_with_a_clear_message(text):
    """Anything else is a ValueError that says which forms are accepted."""
    with pytest.raises(ValueError, match="2026-11-25T03:00:00Z"):
        parse_time(text)


def test_filters_refuse_naive_times_and_empty_ranges():
    """A naive datetime, or since after until, is refused when the filters are built."""
    with pytest.raises(ValueError, match="aware"):
        Filters(since=datetime(2026, 11, 25))  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError, match="after until"):
        Filters(since=START, until=START - timedelta(seconds=1))


def test_normalise_domain_gives_the_logged_form():
    """Domains are compared lower case, as A-labels, without a final dot."""
    assert normalise_domain(" NHS.net. ") == "nhs.net"
    assert normalise_domain("Bücher.example") == "xn--bcher-kva.example"
    with pytest.raises(ValueError):
        normalise_domain("bob@nhs.net")


def test_missing_folder_is_an_audit_error(tmp_path):
    """Searching a folder that does not exist is an AuditError, not a traceback."""
    with pytest.raises(AuditError):
        list(search(tmp_path / "absent", Filters()))


async def test_torn_and_damaged_lines_are_skipped(tmp_path):
    """Lines that are not JSON records are skipped; the records around them are found."""
    first = await _write(tmp_path, _story()[:3])
    [log_file] = log_files(tmp_path)
    with log_file.open("ab") as handle:
        handle.write(b'{"seq":4,"ts":"2026-11-25T03:0')  # torn; restart adds the line feed
    later = await _write(tmp_path, _story()[3:6], clock=_clock(START + timedelta(hours=1)))
    [log_file] = log_files(tmp_path)
    with log_file.open("ab") as handle:
        handle.write(b'[1,2]\n{"seq":99,"event":"x","v":NaN}\n"text"\n{"seq":"7","event":"x"}\n')
        handle.write(b'{"seq":100,"ts":"2026-11-25T09:00:00.000Z","event":"accepted"')  # no LF
    unreadable: list[str] = []
    found = list(search(tmp_path, Filters(), unreadable=unreadable))
    assert [record for record in found if record["event"] != "log_repaired"] == first + later
    assert unreadable == [log_file.name] * 5  # the torn line and four that are not records
    assert [record["seq"] for record in found] == list(range(1, len(found) + 1))
    assert _seqs(tmp_path, events=frozenset({"delivered"})) == [later[1]["seq"]]
    assert _seqs(tmp_path, until=START + timedelta(minutes=2), verdict="release") == [2]


async def test_search_reads_every_file_of_a_rotated_log_in_order(tmp_path):
    """A log split into numbered files is searched across all of them, oldest first."""
    written = await _write(tmp_path, _story())
    [whole] = log_files(tmp_path)
    lines = whole.read_bytes().splitlines(keepends=True)
    whole.unlink()
    (tmp_path / "transfer-000000000001.jsonl").write_bytes(b"".join(lines[:4]))
    (tmp_path / "transfer-000000000005.jsonl").write_bytes(b"".join(lines[4:]))
    assert len(log_files(tmp_path)) == 2
    assert list(search(tmp_path, Filters())) == written
    assert _seqs(tmp_path, pseudonym=BOB) == [2, 3, 5]
    assert _seqs(
        tmp_path, since=START + timedelta(minutes=3), until=START + timedelta(minutes=5)
    ) == [4, 5]


async def test_search_matches_brute_force_over_a_log_of_several_blocks(tmp_path):
    """Over a 2.4 MB log (three 1 MiB blocks), search equals filtering read_records."""
    domains = ["nhs.net", "gmail.com", "met.pnn.police.uk", "bromley.gcsx.gov.uk"]
    events = []
    for number in range(5000):
        domain = domains[number % 4]
        alias = pseudonym(KEY, f"user{number % 37}@{domain}")
        if number % 3:
            events.append(
                _accepted(
                    f"SG-{number}",
                    f"client-{number % 5}",
                    "release" if number % 2 else "hold",
                    [(domain, alias, bool(number % 2))],
                    marking="OFFICIAL" if number % 7 == 0 else None,
                )
            )
        else:
            events.append(
                records.delivery(
                    "delivered",
                    ref=f"SG-{number - 1}",
                    recipients=[alias],
                    host="mx",
                    tls=TLS,
                    response=250,
                )
            )
    log = AuditLog(tmp_path, clock=_clock(step=timedelta(milliseconds=333)))
    await log.start()
    written = []
    for start in range(0, len(events), 250):  # concurrent within a chunk: many ts values
        chunk = events[start : start + 250]
        written += await asyncio.gather(*(log.append(event) for event in chunk))
    await log.close()
    assert sum(path.stat().st_size for path in log_files(tmp_path)) > 2 * 2**20
    every = list(read_records(tmp_path))
    assert sorted(written, key=lambda record: record["seq"]) == every
    probes = [
        Filters(),
        Filters(domain="gmail.com"),
        Filters(pseudonym=pseudonym(KEY, "user5@met.pnn.police.uk")),
        Filters(client="client-3", verdict="hold"),
        Filters(marking="OFFICIAL", events=frozenset({"accepted", "delivered"})),
        Filters(since=START + timedelta(seconds=1), until=START + timedelta(seconds=3)),
        Filters(ref="SG-4000"),
    ]
    for filters in probes:
        expected = [record for record in every if matches(record, filters)]
        assert expected == list(search(tmp_path, filters))
        assert expected


def test_csv_has_a_header_and_one_row_per_record_that_round_trip(story):
    """CSV export writes the header and one row per record, readable back by csv.reader."""
    folder, written = story
    out = io.StringIO(newline="")
    assert len(written) == export_csv(search(folder, Filters()), out)
    text = out.getvalue()
    assert text.endswith("\r\n")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert list(CSV_COLUMNS) == rows[0]
    assert [csv_row(record) for record in written] == rows[1:]
    assert [str(record["seq"]) for record in written] == [row[0] for row in rows[1:]]


def test_csv_row_of_an_accepted_record(story):
    """An accepted record's row flattens parties, shortens the policy and summarises secure."""
    _, written = story
    row = dict(zip(CSV_COLUMNS, csv_row(written[2]), strict=True))
    assert row == {
        "seq": "3",
        "ts": "2026-11-25T03:02:00.000Z",
        "event": "accepted",
        "ref": "SG-B",
        "client": "lewisham-council",
        "verdict": "hold",
        "reasons": "insecure_domain:gmail.com",
        "policy": POLICY[:16],
        "sender_domain": "bromley.gcsx.gov.uk",
        "sender_pseudonym": ALICE,
        "recipient_domains": "nhs.net; gmail.com",
        "recipient_pseudonyms": f"{BOB}; {CAROL}",
        "secure": "mixed",
        "host": "",
        "tls_version": "",
        "tls_verified": "",
        "response": "",
        "reason": "",
        "marking": "OFFICIAL-SENSITIVE [PERSONAL]",
        "purpose": "",
        "size": "121",
        "digest": DIGEST,
        "actor": "",
        "error": "",
    }


def test_csv_rows_of_refused_and_delivery_records(story):
    """Refused rows name the refused recipient; delivery rows its pseudonyms, host and TLS."""
    _, written = story
    refused = dict(zip(CSV_COLUMNS, csv_row(written[3]), strict=True))
    assert (
        refused["recipient_domains"],
        refused["recipient_pseudonyms"],
        refused["secure"],
    ) == ("gmail.com", CAROL, "")
    delivered = dict(zip(CSV_COLUMNS, csv_row(written[4]), strict=True))
    assert (
        delivered["recipient_pseudonyms"],
        delivered["host"],
        delivered["tls_version"],
        delivered["tls_verified"],
        delivered["response"],
    ) == (BOB, "mx.nhs.net", "TLSv1.3", "yes", "250")
    assert dict(zip(CSV_COLUMNS, csv_row(written[1]), strict=True))["secure"] == "yes"


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_cells_that_look_like_formulas_are_defused(start):
    """A cell starting with = + - @ tab or CR gets a leading apostrophe; others are kept."""
    record = {"seq": 1, "ts": "t", "event": "released", "reason": f"{start}1+1", "actor": "ann"}
    row = dict(zip(CSV_COLUMNS, csv_row(record), strict=True))
    assert (f"'{start}1+1", "ann") == (row["reason"], row["actor"])


def test_csv_export_defuses_free_text_from_the_log(story):
    """The policy_rejected error written to the log comes out of the CSV defused."""
    folder, _ = story
    out = io.StringIO(newline="")
    export_csv(search(folder, Filters(events=frozenset({"policy_rejected"}))), out)
    rows = list(csv.reader(io.StringIO(out.getvalue(), newline="")))
    assert rows[1][CSV_COLUMNS.index("error")] == "'" + INJECTION


def test_jsonl_export_lines_are_the_canonical_records(story):
    """JSON Lines export of every record reproduces the log file byte for byte."""
    folder, written = story
    out = io.StringIO(newline="")
    assert len(written) == export_jsonl(search(folder, Filters()), out)
    assert b"".join(path.read_bytes() for path in log_files(folder)) == out.getvalue().encode()


def test_json_export_streams_the_same_list_as_json_dumps(story):
    """The streamed JSON list is the text json.dumps(list, indent=2) gives, empty or not."""
    _, written = story
    for chosen in (written, written[:1], []):
        out = io.StringIO()
        assert len(chosen) == export_json(chosen, out)
        assert json.dumps(chosen, indent=2, ensure_ascii=False) + "\n" == out.getvalue()


_TEXT = st.text(max_size=30)
_EVENTS = st.one_of(
    st.builds(lambda text: records.policy_rejected(error=text), _TEXT),
    st.builds(
        lambda ref, client, n: _accepted(
            ref, client, "hold" if n % 2 else "release", [("nhs.net", BOB, n % 2 == 0)]
        ),
        st.sampled_from(["SG-A", "SG-B"]),
        st.sampled_from(["c1", "c2", "=c3"]),
        st.integers(0, 3),
    ),
    st.builds(
        lambda ref, alias: records.delivery(
            "delivered", ref=ref, recipients=[alias], host="mx", tls=None, response=250
        ),
        st.sampled_from(["SG-A", "SG-B"]),
        st.sampled_from([BOB, CAROL]),
    ),
)
_FILTERS = st.builds(
    Filters,
    since=st.none() | st.just(START + timedelta(seconds=2)),
    until=st.none() | st.just(START + timedelta(seconds=5)),
    events=st.frozensets(st.sampled_from(["accepted", "delivered", "policy_rejected"])),
    verdict=st.none() | st.sampled_from(["release", "hold"]),
    client=st.none() | st.sampled_from(["c1", "=c3"]),
    pseudonym=st.none() | st.sampled_from([BOB, CAROL]),
    ref=st.none() | st.sampled_from(["SG-A", "SG-B"]),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(_EVENTS, max_size=12), _FILTERS)
def test_search_equals_filtering_every_record(events, filters):
    """No filters yield exactly read_records; any filters yield the matching subset in order."""
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        clock = _clock(step=timedelta(seconds=1))
        written = asyncio.run(_write(folder, events, clock)) if events else []
        folder.mkdir(exist_ok=True)
        every = list(read_records(folder))
        assert written == every
        assert every == list(search(folder, Filters()))
        assert [r for r in every if matches(r, filters)] == list(search(folder, filters))
