import json

import pytest

from gateway import records
from gateway.pseudonym import pseudonym
from gateway.records import AuditEvent

KEY = b"k" * 32
CANARY_SENDER = "canary.sender.zq7@bromley.gov.uk"
CANARY_RECIPIENTS = ["canary.child.x9k@nhs.net", "Canary.Worker.m3p@gmail.com"]
CANARY_PARTS = ["canary", "zq7", "x9k", "m3p"]
DIGEST = "sha256:" + "ab" * 32


def _split(address):
    """Return (domain, pseudonym) of an address, as the SMTP layer would pass them."""
    return address.rpartition("@")[2].lower(), pseudonym(KEY, address)


def _all_events():
    """Build one of every record kind from the canary addresses."""
    sender_domain, sender_alias = _split(CANARY_SENDER)
    parties = [_split(address) for address in CANARY_RECIPIENTS]
    return [
        records.accepted(
            ref="SG-01JDQ7",
            client="bromley-council",
            verdict="hold",
            reasons=["insecure_domain:gmail.com"],
            policy="ab" * 32,
            sender_domain=sender_domain,
            sender_pseudonym=sender_alias,
            recipients=[
                (parties[0][0], parties[0][1], True, "nhs.net"),
                (parties[1][0], parties[1][1], False, None),
            ],
            digest=DIGEST,
            size=1234,
            marking="OFFICIAL-SENSITIVE [PERSONAL]",
            purpose="child protection conference",
        ),
        records.refused(
            client="bromley-council",
            policy="ab" * 32,
            sender_domain=sender_domain,
            sender_pseudonym=sender_alias,
            recipient_domain=parties[1][0],
            recipient_pseudonym=parties[1][1],
            reasons=["insecure_domain:gmail.com"],
        ),
        records.delivery(
            "delivered",
            ref="SG-01JDQ7",
            recipients=[parties[0][1]],
            host="mx.example.net",
            tls={"verified": True, "cipher": "TLS_AES_256_GCM_SHA384", "version": "TLSv1.3"},
            response=250,
        ),
        records.held(ref="SG-01JDQ7", reasons=["insecure_domain:gmail.com"], policy="cd" * 32),
        records.policy_loaded(policy="ab" * 32, source="/etc/gateway/policies"),
        records.policy_rejected(error="policies/a.toml:3: unknown key 'domian'"),
    ]


def test_no_record_contains_a_local_part():
    """Records built from canary addresses contain none of their local parts."""
    text = json.dumps([event.body() for event in _all_events()]).lower()
    for part in CANARY_PARTS:
        assert part not in text


def test_accepted_fields_in_spec_order():
    """An accepted record has the SPEC section 6 fields in a fixed order."""
    event = _all_events()[0]
    expected = [
        "event", "ref", "client", "verdict", "reasons", "policy", "sender", "recipients",
        "digest", "size", "marking", "purpose",
    ]  # fmt: skip
    assert expected == list(event.body())
    assert list(event.fields["sender"]) == ["domain", "pseudonym"]
    assert list(event.fields["recipients"][0]) == ["domain", "pseudonym", "secure", "rule"]


def test_accepted_leaves_out_absent_marking_and_purpose():
    """Marking and purpose are absent, not null, when there is none."""
    sender_domain, sender_alias = _split(CANARY_SENDER)
    event = records.accepted(
        ref="SG-1",
        client="c",
        verdict="release",
        reasons=[],
        policy="p",
        sender_domain=sender_domain,
        sender_pseudonym=sender_alias,
        recipients=[],
        digest=DIGEST,
        size=0,
        marking=None,
        purpose=None,
    )
    assert "marking" not in event.fields
    assert "purpose" not in event.fields


def test_address_in_place_of_pseudonym_is_refused_without_echo():
    """Passing an address where a pseudonym belongs raises, and the error does not repeat it."""
    with pytest.raises(ValueError, match="pseudonym") as caught:
        records.delivery(
            "bounced", ref="SG-1", recipients=[CANARY_SENDER], host=None, tls=None, response=550
        )
    assert "canary" not in str(caught.value)


def test_address_in_place_of_domain_is_refused():
    """Passing an address where a domain belongs raises."""
    with pytest.raises(ValueError, match="domain"):
        records.refused(
            client="c",
            policy="p",
            sender_domain=CANARY_SENDER,
            sender_pseudonym=pseudonym(KEY, CANARY_SENDER),
            recipient_domain="gmail.com",
            recipient_pseudonym=pseudonym(KEY, "x@gmail.com"),
            reasons=[],
        )


def test_marking_outside_fixed_list_is_refused():
    """A marking that is not one of the fixed list (it may be subject text) is refused."""
    sender_domain, sender_alias = _split(CANARY_SENDER)
    with pytest.raises(ValueError, match="marking"):
        records.accepted(
            ref="SG-1",
            client="c",
            verdict="hold",
            reasons=[],
            policy="p",
            sender_domain=sender_domain,
            sender_pseudonym=sender_alias,
            recipients=[],
            digest=DIGEST,
            size=1,
            marking="Re: concerns about Jane",
            purpose=None,
        )


def test_delivery_tls_keys_in_fixed_order_and_reason_optional():
    """A delivery record's tls has version, cipher, verified; reason appears only if given."""
    event = _all_events()[2]
    assert list(event.fields["tls"]) == ["version", "cipher", "verified"]
    assert "reason" not in event.fields
    deferred = records.delivery(
        "deferred", ref="SG-1", recipients=[], host=None, tls=None, response=None, reason="no_tls"
    )
    assert list(deferred.fields) == ["recipients", "host", "tls", "response", "reason"]


def test_delivery_rejects_unknown_event_and_tls_keys():
    """Only delivered, deferred and bounced are delivery events, and tls has exactly three keys."""
    with pytest.raises(ValueError, match="delivery event"):
        records.delivery("sent", ref="SG-1", recipients=[], host=None, tls=None, response=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tls"):
        records.delivery(
            "delivered", ref="SG-1", recipients=[], host="h", tls={"version": "1.3"}, response=250
        )


def test_event_fields_may_not_use_writer_keys():
    """An event cannot set seq, ts, prev, event or ref through its fields."""
    with pytest.raises(ValueError, match="writer"):
        AuditEvent("x", None, {"seq": 7})


def test_event_fields_are_read_only():
    """An event's fields cannot be changed after it is built."""
    event = records.policy_rejected(error="bad")
    with pytest.raises(TypeError):
        event.fields["error"] = "other"  # type: ignore[index]


def test_body_puts_event_then_ref_then_fields():
    """The writer's input is event, ref (when set), then the fields in order."""
    event = records.held(ref="SG-9", reasons=["insecure_domain:gmail.com"], policy="p")
    assert list(event.body()) == ["event", "ref", "reasons", "policy"]
    assert list(records.policy_rejected(error="e").body()) == ["event", "error"]


def test_hold_outcomes_have_exactly_the_spec_fields():
    """released, rejected and expired carry actor and reason; released lists dropped recipients."""
    dropped = pseudonym(KEY, CANARY_RECIPIENTS[1])
    released = records.released(
        ref="SG-1", actor="jsmith", reason="now secure", recipients_dropped=[dropped]
    )
    assert list(released.body()) == ["event", "ref", "actor", "reason", "recipients"]
    assert released.fields["recipients"] == [dropped]
    assert "recipients" not in records.released(ref="SG-1", actor="a", reason="ok").fields
    rejected = records.rejected(ref="SG-1", actor="jsmith", reason="wrong recipient")
    assert list(rejected.body()) == ["event", "ref", "actor", "reason"]
    assert list(records.expired(ref="SG-1", reason="hold.max_age").body()) == [
        "event", "ref", "reason",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "reason",
    ["", "   ", "x" * 501, "line\nbreak", "tab\there", "bidi\u202eoverride", "sep\u2028x"],
)
def test_admin_reason_must_be_short_plain_text(reason):
    """A blank, over-long or control-character reason is refused."""
    with pytest.raises(ValueError, match="reason"):
        records.rejected(ref="SG-1", actor="jsmith", reason=reason)


def test_admin_reason_may_be_any_printable_text():
    """Free text in any script, up to 500 characters, is kept as written."""
    reason = "Empfänger bestätigt: jetzt sicher — ok " + "x" * 461
    assert records.rejected(ref="SG-1", actor="jsmith", reason=reason).fields["reason"] == reason


@pytest.mark.parametrize("actor", ["", "root user", "a" * 40, "jane@example.org", "-x"])
def test_actor_must_be_a_unix_user_name(actor):
    """Anything but a plain Unix user name is refused as actor."""
    with pytest.raises(ValueError, match="actor"):
        records.released(ref="SG-1", actor=actor, reason="ok")


def test_released_refuses_addresses_as_dropped_recipients():
    """Dropped recipients are pseudonyms; an address is refused without being echoed."""
    with pytest.raises(ValueError, match="pseudonym") as caught:
        records.released(
            ref="SG-1", actor="a", reason="ok", recipients_dropped=[CANARY_RECIPIENTS[0]]
        )
    assert "canary" not in str(caught.value)


def test_writer_records_check_their_hashes():
    """The checkpoint and log_repaired builders take hex digests and build their fields in order."""
    assert list(records.checkpoint(head="a" * 64, key_id="b" * 16).body()) == [
        "event", "head", "key_id",
    ]  # fmt: skip
    repaired = records.log_repaired(torn_bytes=3, torn_sha256="c" * 64)
    assert list(repaired.body()) == ["event", "torn_bytes", "torn_sha256"]
    with pytest.raises(ValueError, match="head"):
        records.checkpoint(head="xyz", key_id="b" * 16)
    with pytest.raises(ValueError, match="torn_sha256"):
        records.log_repaired(torn_bytes=3, torn_sha256="C" * 64)
