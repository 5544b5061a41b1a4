import base64
import hashlib
import itertools
import re
from datetime import UTC, datetime

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import dkim
from gateway.headers import decision_field, received_field
from gateway.keys import dkim_record_for
from gateway.reference import new_reference

MOMENT = datetime(2026, 11, 25, 3, 42, 30, tzinfo=UTC)
REF = new_reference(MOMENT, random=bytes(range(10)))
OTHER_REF = new_reference(MOMENT, random=bytes(range(1, 11)))
POLICY = "3f2a9c0b7d1e4f5a" + "0" * 48
DOMAIN = "gateway.bromley.gov.uk"
SELECTOR = "gateway"
KEY = Ed25519PrivateKey.generate()
DECISION = {"ref": REF, "verdict": "released", "policy": POLICY[:16], "at": "2026-11-25T03:42:30Z"}

CONTENT = (
    b"From: Duty Social Worker <duty.sw@bromley.gov.uk>\r\n"
    b"To: Safeguarding Lead <safeguarding.lead@nhs.net>\r\n"
    b"Subject: OFFICIAL-SENSITIVE [PERSONAL] Strategy meeting notes,\r\n"
    b"\tcase 4471\r\n"
    b"Date: Wed, 25 Nov 2026 03:40:12 +0000\r\n"
    b"Message-ID: <20261125034012.4471@bromley.gov.uk>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Dear colleague,\r\n"
    b"\r\n"
    b"Please find the notes of this morning's strategy meeting below.\r\n"
    b"Actions are due by Friday.\r\n"
    b"\r\n"
    b"Duty Social Worker\r\n"
)


def _released(ref=REF, content=CONTENT):
    """The message as the worker sends it: decision header, Received, then the content."""
    return (
        decision_field(ref=ref, policy_version=POLICY, at=MOMENT)
        + received_field(
            helo="mail.bromley.gov.uk",
            peer_ip="192.0.2.10",
            hostname=DOMAIN,
            tls="TLSv1.3:TLS_AES_256_GCM_SHA384:256",
            ref=ref,
            moment=MOMENT,
        )
        + content
    )


def _signed(message=None, key=KEY):
    """A released message with its DKIM-Signature field on top."""
    message = _released() if message is None else message
    return dkim.sign(message, key=key, domain=DOMAIN, selector=SELECTOR) + message


def _tags(field):
    """The tags of a DKIM-Signature field, unfolded, as a dict of str."""
    value = re.sub(rb"\s+", b"", field.partition(b":")[2]).decode("ascii")
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


def _dns_table(key=KEY):
    """A DNS lookup answering only the gateway's published key record."""
    record = dkim_record_for(key.public_key()).encode("ascii")
    name = f"{SELECTOR}._domainkey.{DOMAIN}.".encode("ascii")

    def lookup(query, timeout=5):
        return record if query == name else None

    return lookup


def test_signed_message_verifies_with_its_decision():
    """A signed released message verifies and yields the decision it was released on."""
    result = dkim.verify_message(_signed(), KEY.public_key())
    assert result.valid
    assert result.reason == "valid"
    assert result.decision == DECISION
    expected = (DOMAIN, SELECTOR)
    assert expected == (result.domain, result.selector)


def test_signature_field_is_ed25519_relaxed_over_the_decision_header_and_whole_body():
    """The field is RFC 8463 ed25519-sha256, relaxed/relaxed, no l=, decision header first."""
    field = dkim.sign(_released(), key=KEY, domain=DOMAIN, selector=SELECTOR)
    tags = _tags(field)
    signed = tags["h"].split(":")
    assert field.startswith(b"DKIM-Signature: ")
    assert field.endswith(b"\r\n")
    assert b"\n" not in field.replace(b"\r\n", b"")
    expected = ("ed25519-sha256", "relaxed/relaxed")
    assert expected == (tags["a"], tags["c"])
    expected = (DOMAIN, SELECTOR)
    assert expected == (tags["d"], tags["s"])
    assert "l" not in tags
    assert signed[:2] == ["x-safeguarding-decision", "x-safeguarding-decision"]
    assert set(signed) == {name.decode("ascii") for name in dkim.SIGNED_HEADERS}
    assert all(signed.count(name) == 2 for name in signed)


def test_published_record_lets_a_standard_verifier_check_the_signature():
    """Any DKIM verifier with the published TXT record accepts the signature (interoperable)."""
    assert dkimpy.verify(_signed(), dnsfunc=_dns_table())


def test_changed_body_byte_is_body_changed():
    """One changed byte of the body is reported as a changed body."""
    message = _signed().replace(b"due by Friday", b"due by Monday")
    result = dkim.verify_message(message, KEY.public_key())
    assert not result.valid
    assert result.reason == "body_changed"
    assert result.decision is None


def test_changed_decision_header_is_refused():
    """A decision header naming another reference no longer verifies."""
    message = _signed().replace(REF.encode("ascii"), OTHER_REF.encode("ascii"), 1)
    assert OTHER_REF.encode("ascii") in message
    result = dkim.verify_message(message, KEY.public_key())
    expected = (False, "bad_signature", None)
    assert expected == (result.valid, result.reason, result.decision)


def test_changed_verdict_is_refused():
    """Rewriting the verdict in the decision header breaks the signature."""
    message = _signed().replace(b"verdict=released", b"verdict=reviewed", 1)
    assert dkim.verify_message(message, KEY.public_key()).reason == "bad_signature"


@pytest.mark.parametrize("where", ["top", "after_signature", "bottom_of_header"])
def test_added_second_decision_header_is_refused(where):
    """A second decision header, wherever it is added, fails here and for any DKIM verifier."""
    signed = _signed()
    extra = decision_field(ref=OTHER_REF, policy_version=POLICY, at=MOMENT)
    header, _, body = signed.partition(b"\r\n\r\n")
    signature_end = signed.index(b"X-Safeguarding-Decision")
    message = {
        "top": extra + signed,
        "after_signature": signed[:signature_end] + extra + signed[signature_end:],
        "bottom_of_header": header + b"\r\n" + extra + b"\r\n" + body,
    }[where]
    result = dkim.verify_message(message, KEY.public_key())
    expected = (False, "several_decision_headers")
    assert expected == (result.valid, result.reason)
    assert not dkimpy.verify(message, dnsfunc=_dns_table())


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"From: Duty", b"From: Fake"),
        (b"Subject: OFFICIAL", b"Subject: Re: OFFICIAL"),
        (b"MIME-Version: 1.0\r\n", b"MIME-Version: 1.0\r\nCc: someone@example.com\r\n"),
        (b"Content-Type: text/plain", b"Content-Type: text/html"),
    ],
)
def test_changed_or_added_signed_field_is_refused(old, new):
    """Changing a signed field, or adding one the signature covers, breaks the signature."""
    message = _signed().replace(old, new, 1)
    assert dkim.verify_message(message, KEY.public_key()).reason == "bad_signature"


def test_message_checked_with_another_key_is_refused():
    """A message verified with a key other than the signer's is refused."""
    other = Ed25519PrivateKey.generate().public_key()
    result = dkim.verify_message(_signed(), other)
    expected = (False, "bad_signature")
    assert expected == (result.valid, result.reason)


def test_message_signed_by_another_key_is_refused():
    """A message signed by someone else's key, even with our domain and selector, is refused."""
    forged = _signed(key=Ed25519PrivateKey.generate())
    assert dkim.verify_message(forged, KEY.public_key()).reason == "bad_signature"


def test_changes_relaxed_canonicalisation_tolerates_still_verify():
    """Re-folded headers, changed header-name case and trailing white space still verify."""
    message = (
        _signed()
        .replace(b"meeting notes,\r\n\tcase 4471", b"meeting\r\n  notes, case 4471")
        .replace(b"Message-ID:", b"MESSAGE-ID:  ")
        .replace(b"Actions are due by Friday.\r\n", b"Actions are due by  Friday. \t\r\n")
        .replace(b"verdict=released;", b"verdict=released;\r\n\t")
    )
    message += b"\r\n\r\n"
    result = dkim.verify_message(message, KEY.public_key())
    expected = (True, REF)
    assert expected == (result.valid, result.decision and result.decision["ref"])


def test_message_saved_with_lf_line_endings_still_verifies():
    """A .eml file saved with bare LF line endings verifies like the CRLF original."""
    message = _signed().replace(b"\r\n", b"\n")
    assert dkim.verify_message(message, KEY.public_key()).valid


def test_fields_added_above_by_later_hops_do_not_matter():
    """Received and Authentication-Results fields added by the recipient's servers are fine."""
    message = (
        b"Received: from gateway.bromley.gov.uk by mx.nhs.net; Wed, 25 Nov 2026 03:42:31 +0000\r\n"
        b"Authentication-Results: mx.nhs.net; dkim=pass header.d=gateway.bromley.gov.uk\r\n"
        + _signed()
    )
    assert dkim.verify_message(message, KEY.public_key()).valid


def test_another_signature_on_top_does_not_hide_the_gateway_signature():
    """A later DKIM signature by another domain, not over the decision, leaves ours valid."""
    message = _signed()
    other = Ed25519PrivateKey.generate()
    seed = other.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    theirs = dkimpy.sign(
        message,
        b"relay",
        b"nhs.net",
        base64.b64encode(seed),
        signature_algorithm=b"ed25519-sha256",
        include_headers=[b"from", b"subject"],
    )
    result = dkim.verify_message(theirs + message, KEY.public_key())
    expected = (True, DOMAIN)
    assert expected == (result.valid, result.domain)


def test_message_without_signature_is_no_signature():
    """A released message that was never signed is reported as having no signature."""
    result = dkim.verify_message(_released(), KEY.public_key())
    expected = (False, "no_signature", None)
    assert expected == (result.valid, result.reason, result.domain)


def test_signature_whose_h_tag_omits_the_decision_header_is_refused():
    """A valid DKIM signature that does not cover the decision header proves nothing here."""
    message = _released()
    seed = KEY.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    field = dkimpy.sign(
        message,
        SELECTOR.encode("ascii"),
        DOMAIN.encode("ascii"),
        base64.b64encode(seed),
        signature_algorithm=b"ed25519-sha256",
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"subject"],
    )
    assert dkimpy.verify(field + message, dnsfunc=_dns_table())
    result = dkim.verify_message(field + message, KEY.public_key())
    expected = (False, "decision_header_not_signed")
    assert expected == (result.valid, result.reason)


def test_decision_header_removed_after_signing_is_no_decision_header():
    """A signed message whose decision header was taken out says so."""
    message = re.sub(rb"X-Safeguarding-Decision:[^\r]*\r\n", b"", _signed())
    assert dkim.verify_message(message, KEY.public_key()).reason == "no_decision_header"


def test_truncated_signature_value_is_malformed():
    """A b= tag cut short is a malformed signature, not a crash."""
    signed = _signed()
    start = signed.index(b" b=") + 3
    message = signed[:start] + b"AAAA" + signed[signed.index(b"\r\n", start) :]
    message = re.sub(rb"(b=AAAA)\r\n [A-Za-z0-9+/=]+\r\n", rb"\1\r\n", message)
    assert dkim.verify_message(message, KEY.public_key()).reason == "malformed_signature"


@pytest.mark.parametrize("count", [0, 2])
def test_sign_refuses_without_exactly_one_decision_header(count):
    """Signing needs exactly one decision header: none or two is a ValueError."""
    field = decision_field(ref=REF, policy_version=POLICY, at=MOMENT)
    with pytest.raises(ValueError, match="exactly one X-Safeguarding-Decision"):
        dkim.sign(field * count + CONTENT, key=KEY, domain=DOMAIN, selector=SELECTOR)


def test_sign_refuses_a_header_line_that_is_not_a_field_without_quoting_it():
    """A header section line without a colon is refused, and the error does not repeat it."""
    message = _released(content=b"Patient Jane Roe 1970-01-01\r\n" + CONTENT)
    with pytest.raises(ValueError, match="not a header field") as caught:
        dkim.sign(message, key=KEY, domain=DOMAIN, selector=SELECTOR)
    assert "Jane" not in str(caught.value)
    assert caught.value.__cause__ is None
    assert dkim.verify_message(message, KEY.public_key()).reason == "malformed_message"


def test_parse_decision_reads_the_spec_form():
    """The SPEC section 5 header value parses into its four parts, folding undone."""
    value = f" {REF}; verdict=released;\r\n\tpolicy=3f2a9c0b7d1e4f5a; at=2026-11-25T03:42:30Z\r\n"
    assert dkim.parse_decision(value.encode("ascii")) == DECISION


@pytest.mark.parametrize(
    "value",
    [
        "SG-FORGED; verdict=released; policy=3f2a9c0b7d1e4f5a; at=2026-11-25T03:42:30Z",
        f"{REF}; verdict=released; policy=3f2a9c0b7d1e4f5a",
        f"{REF}; verdict=released; policy=3F2A9C0B; at=2026-11-25T03:42:30Z",
        f"{REF}; verdict=released; policy=3f2a9c0b7d1e4f5a; at=2026-11-25 03:42:30",
        f"{REF}; verdict=released; verdict=held; policy=3f2a9c0b7d1e4f5a; at=2026-11-25T03:42:30Z",
        f"{REF}; verdict=released; policy=3f2a9c0b7d1e4f5a; at=2026-11-25T03:42:30Z; sig=x",
        f"{REF}; released; policy=3f2a9c0b7d1e4f5a; at=2026-11-25T03:42:30Z",
        f"{REF}; verdict=relé; policy=3f2a9c0b7d1e4f5a; at=2026-11-25T03:42:30Z",
    ],
)
def test_parse_decision_refuses_other_forms(value):
    """A bad reference, a missing, repeated, unknown or malformed part is a ValueError."""
    with pytest.raises(ValueError, match="decision header"):
        dkim.parse_decision(value.encode("utf-8"))


# -- streamed signing ------------------------------------------------------------------------

# Bytes that exercise relaxed body canonicalisation and dot-stuffing: line ends of both kinds,
# lone CR and LF, white-space runs, dots at line starts, empty lines.
_PIECES = [b"\r\n", b"\r", b"\n", b" ", b"\t", b"  \t ", b".", b"..", b"a", b"Zz", b"\r\n\r\n"]
bodies = st.lists(st.sampled_from(_PIECES) | st.binary(max_size=4), max_size=40).map(b"".join)
field_values = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30
).map(lambda text: text.encode("ascii"))
# One From at most: dkimpy's verifier refuses a message with more (dkimpy bug#644046).
header_fields = st.lists(
    st.tuples(
        st.sampled_from([b"To", b"Subject", b"cc", b"X-Other", b"Date", b"SUBJECT"]),
        field_values,
        st.sampled_from([b"", b"\r\n\tfolded", b"\r\n  more  "]),
    ),
    max_size=6,
).map(
    lambda fields: (
        b"From: a@b.example\r\n"
        + b"".join(name + b": " + value + fold + b"\r\n" for name, value, fold in fields)
    )
)


def _split(data, cuts):
    """`data` cut at the given positions (any order, repeats allowed)."""
    points = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _streamed_signature(message, cuts, timestamp=None):
    """The DKIM-Signature field for `message`, fed to the scanner in pieces."""
    scan = dkim.MessageScan()
    for piece in _split(message, cuts):
        scan.update(piece)
    scan.finish()
    return dkim.sign_scan(scan, key=KEY, domain=DOMAIN, selector=SELECTOR, timestamp=timestamp)


def _dkimpy_signature(message):
    """The field dkimpy writes for the whole message, with the gateway's parameters."""
    seed = KEY.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return dkimpy.sign(
        message,
        SELECTOR.encode("ascii"),
        DOMAIN.encode("ascii"),
        base64.b64encode(seed),
        signature_algorithm=dkim.ALGORITHM,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[name for name in dkim.SIGNED_HEADERS for _ in range(2)],
    )


def _dkimpy_body_hash(message):
    """SHA-256 of the body as dkimpy canonicalises it (relaxed), for the whole message."""
    _, body = dkimpy.rfc822_parse(message)
    return hashlib.sha256(Relaxed.canonicalize_body(body)).digest()


@settings(max_examples=300, deadline=None)
@given(headers=header_fields, body=bodies, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_streamed_signature_verifies_and_hashes_the_body_as_dkimpy_does(headers, body, cuts):
    """Any message signed in any pieces verifies with dkimpy and here; bh= is dkimpy's."""
    message = _released(content=headers + b"\r\n" + body)
    field = _streamed_signature(message, cuts)
    assert dkimpy.verify(field + message, dnsfunc=_dns_table())
    assert dkim.verify_message(field + message, KEY.public_key()).valid
    expected = base64.b64encode(_dkimpy_body_hash(message)).decode("ascii")
    assert expected == _tags(field)["bh"]
    assert expected == _tags(_dkimpy_signature(message))["bh"]


@settings(max_examples=500, deadline=None)
@given(body=bodies, cuts=st.lists(st.integers(0, 200), max_size=10))
def test_body_hash_in_any_pieces_is_dkimpy_relaxed_body_hash(body, cuts):
    """The incremental relaxed body hash equals dkimpy's for any bytes cut anywhere."""
    hasher = dkim.RelaxedBodyHash()
    for piece in _split(body, cuts):
        hasher.update(piece)
    normalised = b"\r\n".join(re.split(b"\r?\n", body))  # how dkimpy reads line ends
    assert hashlib.sha256(Relaxed.canonicalize_body(normalised)).digest() == hasher.digest()


@settings(max_examples=500, deadline=None)
@given(
    head=st.lists(st.sampled_from([*_PIECES, b"A: b", b"From x", b" cont", b"X:"]), max_size=12),
    body=bodies,
    cuts=st.lists(st.integers(0, 200), max_size=8),
)
def test_scan_splits_header_and_body_where_dkimpy_does(head, body, cuts):
    """The header section found in pieces parses as dkimpy parses the message, or both refuse."""
    message = b"".join(head) + body
    scan = dkim.MessageScan()
    for piece in _split(message, cuts):
        scan.update(piece)
    scan.finish()
    try:
        expected = dkimpy.rfc822_parse(message)[0]
    except (dkimpy.MessageFormatError, IndexError):
        with pytest.raises(ValueError, match="not a header field"):
            dkim._header_fields(scan.header)
        return
    assert expected == [[n, v] for n, v in dkim._header_fields(scan.header)]
    assert _dkimpy_body_hash(message) == scan.body_hash()


def test_streamed_field_is_byte_for_byte_what_dkimpy_writes():
    """With the same t=, the field is exactly dkimpy's: same tags, order, folding and b=."""
    message = _released()
    theirs = _dkimpy_signature(message)
    when = int(_tags(theirs)["t"])
    ours = _streamed_signature(message, [1, 100, 101, 400], timestamp=when)
    assert theirs == ours


def test_trailing_empty_lines_held_back_across_pieces_count_when_text_follows():
    """Empty lines at a piece's end are dropped only if the body ends there."""
    ended = dkim.RelaxedBodyHash()
    for piece in (b"a\r\n", b"\r\n\r", b"\n \t\r\n"):
        ended.update(piece)
    continued = dkim.RelaxedBodyHash()
    for piece in (b"a\r\n", b"\r\n\r", b"\n \t\r\n", b"b"):
        continued.update(piece)
    expected = (
        hashlib.sha256(b"a\r\n").digest(),
        hashlib.sha256(b"a\r\n\r\n\r\n\r\nb\r\n").digest(),
    )
    assert expected == (ended.digest(), continued.digest())


def test_long_white_space_runs_and_blank_line_runs_hash_in_one_pass():
    """Megabyte runs of white space and of empty lines canonicalise to one space / nothing."""
    hasher = dkim.RelaxedBodyHash()
    for piece in (b"a", b" \t" * 500_000, b"b" + b" " * 300_000, b"\r\n" * 400_000, b"c\r\n"):
        hasher.update(piece)
    assert hashlib.sha256(b"a b\r\n\r\n" * 1 + b"\r\n" * 399_998 + b"c\r\n").digest() == (
        hasher.digest()
    )


@pytest.mark.parametrize(
    "head",
    [
        b" leading continuation line\r\n",  # dkimpy fails on it with IndexError
        b"Subject: fine\r\nno colon on this line\r\n",
        b"Subject: fine\r\n: empty name\r\n",
    ],
)
def test_streamed_signing_refuses_malformed_header_sections(head):
    """A header section dkimpy cannot read is a ValueError that quotes nothing."""
    scan = dkim.MessageScan()
    scan.update(head + b"\r\nbody\r\n")
    scan.finish()
    with pytest.raises(ValueError, match="not a header field") as caught:
        dkim.sign_scan(scan, key=KEY, domain=DOMAIN, selector=SELECTOR)
    assert "colon" not in str(caught.value)
    assert "continuation" not in str(caught.value)


def test_mbox_from_line_is_skipped_as_dkimpy_skips_it():
    """An mbox `From ` line in the header section is ignored, as dkimpy ignores it."""
    message = _released(content=b"From someone Wed Nov 25 03:40:12 2026\r\n" + CONTENT)
    assert dkim.verify_message(_streamed_signature(message, [7]) + message, KEY.public_key()).valid


def test_header_section_over_the_limit_is_not_signed():
    """A header section larger than the scan keeps is refused rather than signed in part."""
    scan = dkim.MessageScan(max_header=1000)
    scan.update(_released(content=b"X-Filler: " + b"f" * 2000 + b"\r\n" + CONTENT))
    scan.finish()
    assert scan.too_large
    assert len(scan.header) == 1000
    with pytest.raises(ValueError, match="too large"):
        dkim.sign_scan(scan, key=KEY, domain=DOMAIN, selector=SELECTOR)
