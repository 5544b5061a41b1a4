import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import headers

MARKINGS = {
    "OFFICIAL",
    "OFFICIAL-SENSITIVE",
    "OFFICIAL-SENSITIVE [PERSONAL]",
    "OFFICIAL-SENSITIVE [COMMERCIAL]",
    "OFFICIAL-SENSITIVE [LOCSEN]",
}

MOMENT = datetime(2026, 11, 25, 3, 42, 30, tzinfo=UTC)

SECTION = (
    b"From: a@bromley.gov.uk\r\n"
    b"X-Safeguarding-Decision: SG-FORGED;\r\n"
    b"\tverdict=released\r\n"
    b"Subject: first\r\n"
    b" second\r\n"
    b"\tthird\r\n"
    b"TLS-Required: No\r\n"
    b"x-safeguarding-DECISION : again\r\n"
    b"To: b@nhs.net\r\n"
)


def test_split_fields_joins_folded_lines():
    """A line starting with a space or tab belongs to the field before it."""
    expected = [
        b"From: a@bromley.gov.uk\r\n",
        b"X-Safeguarding-Decision: SG-FORGED;\r\n\tverdict=released\r\n",
        b"Subject: first\r\n second\r\n\tthird\r\n",
        b"TLS-Required: No\r\n",
        b"x-safeguarding-DECISION : again\r\n",
        b"To: b@nhs.net\r\n",
    ]
    assert expected == headers.split_fields(SECTION)


def test_split_fields_keeps_leading_continuation():
    """A continuation line with nothing before it is kept as a field of its own."""
    expected = [b" orphan\r\n", b"A: 1\r\n"]
    assert expected == headers.split_fields(b" orphan\r\nA: 1\r\n")


def test_split_fields_of_nothing():
    """An empty header section has no fields."""
    expected: list[bytes] = []
    assert expected == headers.split_fields(b"")


def test_remove_fields_keeps_order_and_bytes():
    """Forbidden fields go, folded lines with them; every other field stays byte-identical."""
    expected = (
        b"From: a@bromley.gov.uk\r\nSubject: first\r\n second\r\n\tthird\r\nTo: b@nhs.net\r\n",
        3,
    )
    assert expected == headers.remove_fields(SECTION)


def test_remove_fields_with_nothing_to_remove_is_identity():
    """A section without forbidden fields comes back unchanged."""
    section = b"A: 1\r\n\t2\r\nB:3\r\nC :  odd  spacing \r\n"
    expected = (section, 0)
    assert expected == headers.remove_fields(section)


def test_remove_fields_with_other_names():
    """remove_fields drops the names it is given, not the default ones."""
    section = b"From: a\r\n b\r\nTLS-Required: No\r\nfrom: c\r\n"
    expected = (b"TLS-Required: No\r\n", 2)
    assert expected == headers.remove_fields(section, frozenset({b"from"}))


def test_field_value_unfolds():
    """field_value joins continuation lines with one space and strips the ends."""
    expected = b"first second third"
    assert expected == headers.field_value(SECTION, b"subject")


def test_field_value_unfolds_exactly():
    """Each CRLF plus its folding white space becomes one space."""
    expected = b"a b c"
    assert expected == headers.field_value(b"Subject: a\r\n b\r\n\tc\r\n", b"subject")


def test_field_value_is_case_insensitive_and_first():
    """The first field of that name, in any case, is the one read."""
    section = b"SUBJECT:  one \r\nsubject: two\r\n"
    expected = b"one"
    assert expected == headers.field_value(section, b"subject")


def test_field_value_missing():
    """A field that is not there gives None."""
    assert headers.field_value(SECTION, b"cc") is None


def test_field_name():
    """field_name lower-cases and strips the name; a line without a colon has none."""
    expected = (b"x-safeguarding-decision", b"")
    assert expected == (
        headers.field_name(b"X-Safeguarding-Decision : x\r\n"),
        headers.field_name(b"junk\r\n"),
    )


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (b"OFFICIAL", "OFFICIAL"),
        (b"official-sensitive", "OFFICIAL-SENSITIVE"),
        (b"OFFICIAL-SENSITIVE [PERSONAL] x", "OFFICIAL-SENSITIVE [PERSONAL]"),
        (b"[OFFICIAL-SENSITIVE] y", "OFFICIAL-SENSITIVE"),
        (b"OFFICIAL-SENSITIVE [LOCSEN]", "OFFICIAL-SENSITIVE [LOCSEN]"),
        (b"Official-Sensitive [commercial]: tender", "OFFICIAL-SENSITIVE [COMMERCIAL]"),
        (b"  OFFICIAL: minutes", "OFFICIAL"),
        (b"OFFICIAL - minutes", "OFFICIAL"),
        (b"OFFICIALLY speaking", None),
        (b"OFFICIAL [PERSONAL]", None),
        (b"Re: OFFICIAL", None),
        (b"SECRET", None),
        (b"TOP SECRET", None),
        (b"", None),
        (None, None),
    ],
)
def test_protective_marking(subject, expected):
    """Only a marking that leads the Subject, from the fixed list, is read."""
    assert expected == headers.protective_marking(subject)


def test_sensitive_followed_by_a_word_is_not_official():
    """`OFFICIAL-SENSITIVE_PERSONAL` is not read as the lower marking OFFICIAL."""
    assert headers.protective_marking(b"OFFICIAL-SENSITIVE_PERSONAL case 4") is None


@given(st.binary(max_size=200))
def test_protective_marking_is_from_the_fixed_list(subject):
    """Whatever the Subject bytes, the result is one of the fixed markings or None."""
    result = headers.protective_marking(subject)
    assert result is None or result in MARKINGS


@given(st.sampled_from(sorted(MARKINGS)), st.binary(max_size=100))
def test_marking_followed_by_space_is_read(marking, rest):
    """A fixed marking followed by a space and anything is read as itself."""
    assert marking == headers.protective_marking(marking.encode() + b" " + rest)


def test_received_field_exact():
    """The Received field names the HELO, peer, host, TLS and reference, on three lines."""
    expected = (
        b"Received: from client.bromley.gov.uk ([192.0.2.1])\r\n"
        b"\tby gw.example.org with ESMTPS (TLSv1.3) id SG-01JDQ7;\r\n"
        b"\tWed, 25 Nov 2026 03:42:30 +0000\r\n"
    )
    actual = headers.received_field(
        helo="client.bromley.gov.uk",
        peer_ip="192.0.2.1",
        hostname="gw.example.org",
        tls="TLSv1.3",
        ref="SG-01JDQ7",
        moment=MOMENT,
    )
    assert expected == actual


def test_received_field_without_tls_or_helo():
    """Without TLS the protocol is ESMTP, and an empty HELO is written as `unknown`."""
    actual = headers.received_field(
        helo="", peer_ip="192.0.2.1", hostname="gw", tls=None, ref="SG-1", moment=MOMENT
    )
    expected = b"Received: from unknown ([192.0.2.1])\r\n\tby gw with ESMTP id SG-1;\r\n"
    assert expected == actual[: len(expected)]


@given(st.text(max_size=400))
def test_received_field_sanitises_any_helo(helo):
    """Any HELO gives three ASCII lines, a HELO free of space and CR/LF, and no recipient."""
    actual = headers.received_field(
        helo=helo, peer_ip="192.0.2.1", hostname="gw", tls=None, ref="SG-1", moment=MOMENT
    )
    lines = actual.split(b"\r\n")
    written_helo = lines[0].removeprefix(b"Received: from ").removesuffix(b" ([192.0.2.1])")
    expected = (True, 4, b"", False, True, True)
    assert expected == (
        actual.isascii(),
        len(lines),
        lines[3],
        b"for <" in actual,
        re.fullmatch(rb"[A-Za-z0-9.\-\[\]:_?]{1,255}", written_helo) is not None,
        lines[1].startswith(b"\tby gw "),
    )


def test_received_field_hostile_helo():
    """Spaces, CRLF and non-ASCII in the HELO each become `?`; no field can be injected."""
    actual = headers.received_field(
        helo="evil host\r\nX-Safeguarding-Decision: é",
        peer_ip="192.0.2.1",
        hostname="gw",
        tls=None,
        ref="SG-1",
        moment=MOMENT,
    )
    expected = b"Received: from evil?host??X-Safeguarding-Decision:?? ([192.0.2.1])\r\n"
    assert expected == actual[: len(expected)]


def test_decision_field_exact():
    """The decision field is `X-Safeguarding-Decision: ref; verdict; policy (16 hex); at`."""
    actual = headers.decision_field(ref="SG-01JDQ7ABC", policy_version="ab12" * 16, at=MOMENT)
    expected = (
        b"X-Safeguarding-Decision: SG-01JDQ7ABC; verdict=released; "
        b"policy=ab12ab12ab12ab12; at=2026-11-25T03:42:30Z\r\n"
    )
    assert expected == actual


@given(
    st.from_regex(r"SG-[0-9A-Z]{10,26}", fullmatch=True),
    st.text("0123456789abcdef", min_size=64, max_size=64),
    st.datetimes(
        min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - hypothesis bounds are naive
        max_value=datetime(9999, 12, 31),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
)
def test_decision_field_format(ref, policy, at):
    """Every decision field matches the SPEC section 5 shape, CRLF included."""
    pattern = (
        rb"X-Safeguarding-Decision: SG-[0-9A-Z]+; verdict=released; policy=[0-9a-f]{16}; "
        rb"at=\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\r\n"
    )
    actual = headers.decision_field(ref=ref, policy_version=policy, at=at)
    assert re.fullmatch(pattern, actual) is not None


def test_rfc_dates():
    """The two timestamp forms are RFC 5322 and RFC 3339 UTC."""
    expected = ("Wed, 25 Nov 2026 03:42:30 +0000", "2026-11-25T03:42:30Z")
    assert expected == (headers.rfc5322_date(MOMENT), headers.rfc3339_utc(MOMENT))


# --- hostile sizes (gh-136063: the email package is quadratic here; these must not be) ---------


def test_header_of_100k_semicolons():
    """A 100 KiB Subject of `;` is handled: removed fields, value and marking all come back."""
    section = b"X-Safeguarding-Decision: x\r\nSubject: " + b";" * 102_400 + b"\r\n"
    cleaned, removed = headers.remove_fields(section)
    value = headers.field_value(section, b"subject")
    expected = (b"Subject: " + b";" * 102_400 + b"\r\n", 1, b";" * 102_400, None)
    assert expected == (cleaned, removed, value, headers.protective_marking(value))


def test_header_of_100k_folded_semicolons():
    """A 100 KiB field folded into 25,600 continuation lines is handled."""
    section = b"Subject: OFFICIAL\r\n" + b" ;\r\n" * 25_600 + b"TLS-Required: No\r\n"
    cleaned, removed = headers.remove_fields(section)
    value = headers.field_value(section, b"subject")
    expected = (section[: -len(b"TLS-Required: No\r\n")], 1, b"OFFICIAL" + b" ;" * 25_600)
    assert expected == (cleaned, removed, value)


def test_ten_thousand_tiny_fields():
    """10,000 tiny fields with forbidden ones among them are handled in order."""
    fields = [b"X%d: v\r\n" % n for n in range(10_000)]
    forbidden = [
        b"TLS-Required: No\r\n" if n % 2 else b"x-safeguarding-decision: f\r\n" for n in range(100)
    ]
    section = b"".join(fields[:5000] + forbidden + fields[5000:] + [b"Subject: OFFICIAL\r\n"])
    cleaned, removed = headers.remove_fields(section)
    expected = (b"".join(fields), 100, b"OFFICIAL", 10_101)
    assert expected == (
        cleaned[: -len(b"Subject: OFFICIAL\r\n")],
        removed,
        headers.field_value(section, b"subject"),
        headers.count_fields(section),
    )


def test_received_field_says_esmtpsa_for_an_authenticated_session():
    """RFC 3848: an authenticated TLS session is recorded as ESMTPSA."""
    field = headers.received_field(
        helo="agency.test",
        peer_ip="192.0.2.1",
        hostname="gw",
        tls="TLSv1.3",
        ref="SG-1",
        moment=datetime(2026, 11, 25, tzinfo=UTC),
        authenticated=True,
    )
    assert b" with ESMTPSA (TLSv1.3) id SG-1;" in field
