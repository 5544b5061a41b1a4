import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.decision import Decision, Verdict, decide
from gateway.policy import DomainVerdict, parse_policy
from gateway.reference import new_reference

NOW = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC)
REF = new_reference(NOW, bytes(10))
POLICY = parse_policy(
    [
        (
            Path("p.toml"),
            """\
[[secure_domains]]
domain = "nhs.net"

[[secure_domains]]
domain = "gcsx.gov.uk"
subdomains = true

[[secure_domains]]
domain = "old.nhs.uk"
review_by = 2026-01-01
""",
        )
    ]
)


def test_release_when_all_secure():
    """Mail whose every recipient domain is secure is released with no reasons."""
    decision = decide(["nhs.net", "bromley.gcsx.gov.uk"], POLICY, NOW, REF)
    assert decision == Decision(
        ref=REF,
        verdict=Verdict.RELEASE,
        reasons=(),
        policy_version=POLICY.version,
        recipients=(
            DomainVerdict("nhs.net", secure=True, rule="nhs.net", reason=None),
            DomainVerdict("bromley.gcsx.gov.uk", secure=True, rule="*.gcsx.gov.uk", reason=None),
        ),
        at=NOW,
    )
    assert decision.reply_detail() == ""


def test_hold_when_any_insecure():
    """One insecure recipient holds the whole message, with one reason per distinct domain."""
    decision = decide(
        ["gmail.com", "nhs.net", "old.nhs.uk", "yahoo.com", "gmail.com"], POLICY, NOW, REF
    )
    assert decision.verdict is Verdict.HOLD
    assert decision.reasons == (
        "insecure_domain:gmail.com",
        "entry_expired:old.nhs.uk",
        "insecure_domain:yahoo.com",
    )
    assert [v.domain for v in decision.recipients] == [
        "gmail.com",
        "nhs.net",
        "old.nhs.uk",
        "yahoo.com",
        "gmail.com",
    ]
    assert (
        decision.reply_detail()
        == "insecure_domain: gmail.com, yahoo.com; entry_expired: old.nhs.uk"
    )


def test_expiry_uses_the_utc_date_of_now():
    """Entries are judged on the UTC date of the decision time."""
    before = dt.datetime(2026, 1, 1, 23, 59, tzinfo=dt.UTC)
    assert decide(["old.nhs.uk"], POLICY, before, REF).verdict is Verdict.RELEASE
    late_local = dt.datetime(2026, 1, 2, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=3)))
    assert decide(["old.nhs.uk"], POLICY, late_local, REF).verdict is Verdict.RELEASE


def test_junk_domains_are_escaped_in_reasons():
    """A junk domain cannot put control characters or non-ASCII into the reply."""
    decision = decide(["a\r\nb.com", "nhs.n\u0435t"], POLICY, NOW, REF)
    assert decision.reasons == ("not_a_domain:a\\r\\nb.com", "not_a_domain:nhs.n\\u0435t")
    assert decision.reply_detail().isprintable()
    assert decision.reply_detail().isascii()


def test_no_recipients_is_an_error():
    """A decision needs at least one recipient."""
    with pytest.raises(ValueError):
        decide([], POLICY, NOW, REF)


def test_naive_time_is_an_error():
    """The decision time must be timezone-aware."""
    with pytest.raises(ValueError):
        decide(["nhs.net"], POLICY, NOW.replace(tzinfo=None), REF)


@given(
    st.lists(
        st.sampled_from(["nhs.net", "a.gcsx.gov.uk", "gmail.com", "old.nhs.uk", "x.nhs.net"]),
        min_size=1,
    )
)
def test_release_iff_every_recipient_secure(domains):
    """The verdict is release exactly when every recipient verdict is secure."""
    decision = decide(domains, POLICY, NOW, REF)
    all_secure = all(POLICY.classify(d, NOW.date()).secure for d in domains)
    assert (decision.verdict is Verdict.RELEASE) == all_secure
    assert (decision.reasons == ()) == all_secure
    assert len(decision.recipients) == len(domains)
    assert len(set(decision.reasons)) == len(decision.reasons)
