import base64
import re
from datetime import UTC, datetime

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
