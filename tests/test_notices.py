import email
import email.policy
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage

import pytest

from gateway.notices import ADMIN_REASON_LIMIT, Notice, NoticeKind, build_notice
from gateway.queue_entry import QueueEntry, Recipient, State
from gateway.reference import new_reference

RECEIVED = datetime(2026, 11, 25, 3, 42, 30, tzinfo=UTC)
NOW = RECEIVED + timedelta(hours=2)
REF = new_reference(RECEIVED, bytes(10))
SENDER = "canarysender@bromley.gcsx.gov.uk"
GMAIL_1 = Recipient("canaryrecipient@gmail.com", "gmail.com", "a" * 16)
GMAIL_2 = Recipient("canarysecond@gmail.com", "gmail.com", "b" * 16)
YAHOO = Recipient("canarythird@yahoo.co.uk", "yahoo.co.uk", "c" * 16)
NHS = Recipient("canarysecure@nhs.net", "nhs.net", "d" * 16)
CANARIES = ("canaryrecipient", "canarysecond", "canarythird", "canarysecure")
ENTRY = QueueEntry(
    ref=REF,
    state=State.HELD,
    received=RECEIVED,
    client="bromley-council",
    sender=SENDER,
    sender_domain="bromley.gcsx.gov.uk",
    sender_pseudonym="p" * 16,
    recipients=(GMAIL_1, NHS, GMAIL_2, YAHOO),
    verdict="hold",
    reasons=("insecure_domain:gmail.com", "insecure_domain:yahoo.co.uk"),
    policy="f" * 64,
    decided_at=RECEIVED,
    size=1234,
    digest="sha256:" + "0" * 64,
)
INSECURE = (GMAIL_1, GMAIL_2, YAHOO)


def notice(
    kind: NoticeKind = NoticeKind.HELD,
    *,
    entry: QueueEntry = ENTRY,
    concerned: tuple[Recipient, ...] = INSECURE,
    reasons: tuple[str, ...] = ENTRY.reasons,
    admin_reason: str | None = None,
    from_address: str = "Secure transfer gateway <postmaster@gateway.example.org>",
) -> Notice | None:
    """Build a notice about ENTRY with the test's defaults."""
    return build_notice(
        entry,
        kind,
        concerned=concerned,
        reasons=reasons,
        now=NOW,
        from_address=from_address,
        reporting_mta="gateway.example.org",
        message_id_domain="gateway.example.org",
        admin_reason=admin_reason,
    )


def parsed(kind: NoticeKind = NoticeKind.HELD, **kwargs) -> EmailMessage:
    """Build a notice and parse it with the standard library's modern policy."""
    built = notice(kind, **kwargs)
    assert built is not None
    message = email.message_from_bytes(built.message, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def text_of(message: EmailMessage) -> str:
    """The notice's plain text, its white space collapsed so that wrapping does not matter."""
    part = message.get_payload()[0]
    return " ".join(part.get_content().split())


def recipient_blocks(message: EmailMessage):
    """The field blocks of the delivery-status part: per message, then per domain."""
    status = message.get_payload()[1]
    return status.get_payload()


def test_held_notice_is_a_delivery_status_report():
    """A held notice parses as multipart/report with report-type delivery-status."""
    message = parsed()
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    parts = message.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status"]
    assert message.defects == []
    assert all(p.defects == [] for p in parts)


def test_headers_of_a_held_notice():
    """The notice goes from the gateway to the original sender, auto-replied, with its date."""
    message = parsed()
    assert message["From"] == "Secure transfer gateway <postmaster@gateway.example.org>"
    assert message["To"] == SENDER
    assert (
        message["Subject"] == f"Held: your message {REF} was not sent (recipient domain not secure)"
    )
    assert message["Date"].datetime == NOW
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Message-ID"] == f"<{REF}-notice-held@gateway.example.org>"


def test_held_delivery_status_fields():
    """Part 2 holds the per-message fields and one delayed block per concerned domain."""
    blocks = recipient_blocks(parsed())
    per_message, *per_domain = blocks
    assert per_message["Reporting-MTA"] == "dns; gateway.example.org"
    assert per_message["X-Safeguarding-Reference"] == REF
    assert per_message["Arrival-Date"] == "Wed, 25 Nov 2026 03:42:30 +0000"
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in per_domain] == [
        ("x-safeguarding; gmail.com", "delayed", "4.7.1"),
        ("x-safeguarding; yahoo.co.uk", "delayed", "4.7.1"),
    ]
    assert [b["Diagnostic-Code"] for b in per_domain] == ["x-safeguarding; insecure_domain"] * 2


def test_text_names_reference_domains_and_next_steps():
    """The plain text gives the reference, the time received, the domains and what to do next."""
    text = text_of(parsed())
    assert REF in text
    assert "25 Nov 2026 03:42 UTC" in text
    assert "gmail.com (2 recipients)" in text
    assert "yahoo.co.uk (1 recipient)" in text
    assert "nhs.net (" not in text
    assert "not on the secure-domain list" in text
    assert "you do not need to send it again" in text
    assert "IT service desk" in text


@pytest.mark.parametrize("kind", list(NoticeKind))
def test_no_recipient_address_or_local_part_anywhere(kind):
    """No recipient's local part appears in any notice, even when the admin's reason names one."""
    built = notice(kind, admin_reason="Sent to canaryrecipient@gmail.com by mistake")
    assert built is not None
    lowered = built.message.lower()
    for canary in CANARIES:
        assert canary.encode() not in lowered
    assert built.message.count(b"canarysender") == 1  # the To field only


@pytest.mark.parametrize(
    ("kind", "subject", "action", "status"),
    [
        (NoticeKind.HELD, "Held: your message {} was not sent", "delayed", "4.7.1"),
        (NoticeKind.REJECTED, "Rejected: your message {} was not sent", "failed", "5.7.1"),
        (NoticeKind.EXPIRED, "Expired: your message {} was not sent", "failed", "4.4.7"),
        (NoticeKind.BOUNCED, "Undeliverable: your message {} could not", "failed", "5.7.1"),
        (NoticeKind.RELEASED_PARTLY, "Partly sent: your message {} was not", "failed", "5.7.1"),
    ],
)
def test_subject_and_status_by_kind(kind, subject, action, status):
    """Each kind has its own subject, Action and Status code."""
    message = parsed(kind)
    assert message["Subject"].startswith(subject.format(REF))
    _, *per_domain = recipient_blocks(message)
    assert {(b["Action"], b["Status"]) for b in per_domain} == {(action, status)}
    assert message["Message-ID"] == f"<{REF}-notice-{kind.value}@gateway.example.org>"


@pytest.mark.parametrize(
    ("reasons", "status", "code"),
    [
        (("queue_lifetime",), "4.4.7", "queue_lifetime"),
        (("no_starttls at mx.example.net:25",), "4.7.4", "no_starttls"),
        (("certificate",), "4.7.5", "certificate"),
        (("tls_handshake",), "4.7.5", "tls_handshake"),
        (("rejected",), "5.0.0", "rejected"),
        (("no_smtputf8",), "5.6.7", "no_smtputf8"),
        (("odd-reason",), "5.0.0", "unspecified"),
        ((), "5.0.0", "unspecified"),
    ],
)
def test_bounce_status_follows_the_reason(reasons, status, code):
    """A bounce's Status and Diagnostic-Code come from the reason that ended delivery."""
    _, block = recipient_blocks(parsed(NoticeKind.BOUNCED, concerned=(YAHOO,), reasons=reasons))
    assert (block["Status"], block["Diagnostic-Code"]) == (status, f"x-safeguarding; {code}")


def test_tls_failure_is_explained_in_words():
    """A bounce after TLS failures says the receiving server could not prove a secure connection."""
    text = text_of(parsed(NoticeKind.BOUNCED, concerned=(YAHOO,), reasons=("certificate",)))
    assert "could not prove a secure connection" in text
    assert "check the recipient's address" in text.lower()


def test_reasons_tagged_with_a_domain_apply_to_that_domain_only():
    """`code:domain` reasons go to their own domain's block; untagged ones go to every block."""
    reasons = ("entry_expired:yahoo.co.uk", "insecure_domain:gmail.com", "queue_lifetime")
    _, gmail, yahoo = recipient_blocks(parsed(NoticeKind.BOUNCED, reasons=reasons))
    assert gmail["Diagnostic-Code"] == "x-safeguarding; insecure_domain, queue_lifetime"
    assert yahoo["Diagnostic-Code"] == "x-safeguarding; entry_expired, queue_lifetime"


def test_expired_and_rejected_lead_with_their_own_code():
    """Expired and rejected notices name what ended the hold before the hold's reasons."""
    _, expired, _ = recipient_blocks(parsed(NoticeKind.EXPIRED))
    _, rejected, _ = recipient_blocks(parsed(NoticeKind.REJECTED))
    assert expired["Diagnostic-Code"] == "x-safeguarding; hold_max_age, insecure_domain"
    assert rejected["Diagnostic-Code"] == "x-safeguarding; rejected_by_admin, insecure_domain"


@pytest.mark.parametrize("sender", ["", "<>", "MAILER-DAEMON@bromley.gov.uk", "a b@x.org", "x"])
def test_no_notice_to_a_null_or_notice_sender(sender):
    """No notice goes to the null path, to MAILER-DAEMON, or to something that is no address."""
    assert notice(entry=replace(ENTRY, sender=sender)) is None


def test_no_notice_about_the_gateways_own_notice():
    """Mail from the gateway's own notice address never gets a notice back."""
    entry = replace(ENTRY, sender="Postmaster@gateway.example.org")
    assert notice(entry=entry) is None
    assert notice(entry=entry, from_address="postmaster@gateway.example.org") is None


def test_no_notice_about_an_entry_marked_as_a_notice():
    """An entry that is itself a notice never gets a notice, whatever its sender."""
    assert notice(entry=replace(ENTRY, notice=True)) is None


def test_bare_from_address_gets_a_display_name():
    """A bare `[notices] from` address is shown with the gateway's name."""
    message = parsed(from_address="postmaster@gateway.example.org")
    assert message["From"] == "Secure transfer gateway <postmaster@gateway.example.org>"


def test_admin_reason_is_cleaned_and_capped():
    """The admin's reason loses control characters and is cut to the limit, all on one line."""
    reason = "Wrong\x1b[31m person\r\nBcc: x\u202e\u00e9t\u00e9 \u201cok\u201d " + "z" * 900
    text = text_of(parsed(NoticeKind.REJECTED, admin_reason=reason))
    joined = text.split("The administrator's reason: ")[1].split(" WHAT TO DO NEXT")[0]
    lead = 'Wrong[31m person Bcc: xete "ok" '
    assert joined.startswith(lead + "zzz")
    assert joined.endswith("...")
    assert joined.count("z") == ADMIN_REASON_LIMIT - len(lead) - len("...")
    assert "\x1b" not in text
    assert "\u202e" not in text


def test_admin_reason_only_for_rejected_and_dropped():
    """The admin's reason appears in rejected and partly-sent notices, not in the others."""
    shown = {
        kind: "Duplicate of an earlier message"
        in text_of(parsed(kind, admin_reason="Duplicate of an earlier message"))
        for kind in NoticeKind
    }
    assert shown == {
        NoticeKind.HELD: False,
        NoticeKind.REJECTED: True,
        NoticeKind.EXPIRED: False,
        NoticeKind.BOUNCED: False,
        NoticeKind.RELEASED_PARTLY: True,
    }


def test_message_id_is_stable_for_the_same_reference_and_kind():
    """Building the same notice again, later, gives the same Message-ID and the same body."""
    first = notice()
    again = build_notice(
        ENTRY,
        NoticeKind.HELD,
        concerned=INSECURE,
        reasons=ENTRY.reasons,
        now=NOW + timedelta(minutes=5),
        from_address="Secure transfer gateway <postmaster@gateway.example.org>",
        reporting_mta="gateway.example.org",
        message_id_domain="gateway.example.org",
    )
    assert first is not None
    assert again is not None
    assert (
        parsed()["Message-ID"]
        == email.message_from_bytes(again.message, policy=email.policy.default)["Message-ID"]
    )
    assert first.message.split(b"\r\n\r\n", 1)[1] == again.message.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("kind", list(NoticeKind))
def test_lines_are_crlf_ascii_and_short(kind):
    """Every notice is pure ASCII with CRLF line ends and no line over 998 octets."""
    long_domain = ".".join(["a" * 63] * 3) + ".example"
    entry = replace(
        ENTRY, recipients=(*ENTRY.recipients, Recipient("x@" + long_domain, long_domain, "e" * 16))
    )
    built = notice(
        kind,
        entry=entry,
        concerned=(*INSECURE, entry.recipients[-1]),
        reasons=tuple(f"code_{n}" for n in range(40)),
        admin_reason="\u00e9" * 2000,
    )
    assert built is not None
    assert built.message.isascii()
    assert built.message.endswith(b"\r\n")
    lines = built.message.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert max(len(line) for line in lines) <= 998


def test_non_ascii_sender_keeps_the_message_ascii():
    """An SMTPUTF8 sender still gets the notice; the To field then names no one."""
    entry = replace(ENTRY, sender="j\u00f6rg@bromley.gcsx.gov.uk", smtputf8=True)
    built = notice(entry=entry)
    assert built is not None
    assert built.sender == "j\u00f6rg@bromley.gcsx.gov.uk"
    assert built.message.isascii()
    message = email.message_from_bytes(built.message, policy=email.policy.default)
    assert message["To"] == "undisclosed-recipients:;"


def test_notice_sender_is_the_original_envelope_sender():
    """The notice is addressed, in the envelope, to the original envelope sender."""
    built = notice()
    assert built is not None
    assert built.sender == SENDER


def test_date_is_in_utc_whatever_the_zone_of_now():
    """A `now` in another zone is written as the same moment in UTC."""
    local = NOW.astimezone(timezone(timedelta(hours=1)))
    built = build_notice(
        ENTRY,
        NoticeKind.HELD,
        concerned=INSECURE,
        reasons=(),
        now=local,
        from_address="postmaster@gateway.example.org",
        reporting_mta="gateway.example.org",
        message_id_domain="gateway.example.org",
    )
    assert built is not None
    assert b"Date: Wed, 25 Nov 2026 05:42:30 +0000\r\n" in built.message


def test_refuses_recipients_not_in_the_message():
    """Recipients that are not the message's own, or none at all, are a programming error."""
    stranger = Recipient("someone@example.com", "example.com", "z" * 16)
    with pytest.raises(ValueError, match="recipients"):
        notice(concerned=(stranger,))
    with pytest.raises(ValueError, match="recipients"):
        notice(concerned=())


def test_refuses_a_naive_time_and_bad_host_names():
    """A time without a zone, or a host name with spaces, is refused."""
    with pytest.raises(ValueError, match="timezone"):
        build_notice(
            ENTRY,
            NoticeKind.HELD,
            concerned=INSECURE,
            reasons=(),
            now=NOW.replace(tzinfo=None),
            from_address="postmaster@gateway.example.org",
            reporting_mta="gateway.example.org",
            message_id_domain="gateway.example.org",
        )
    with pytest.raises(ValueError, match="reporting_mta"):
        build_notice(
            ENTRY,
            NoticeKind.HELD,
            concerned=INSECURE,
            reasons=(),
            now=NOW,
            from_address="postmaster@gateway.example.org",
            reporting_mta="gateway example",
            message_id_domain="gateway.example.org",
        )


def test_never_carries_original_content():
    """A notice has exactly two parts: no copy of the original message or its headers."""
    built = notice(NoticeKind.BOUNCED)
    assert built is not None
    message = email.message_from_bytes(built.message, policy=email.policy.default)
    assert len(message.get_payload()) == 2
    assert b"rfc822" not in built.message
