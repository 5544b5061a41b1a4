import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ConfigError, PolicyError
from gateway.policy import (
    OnInsecure,
    Policy,
    canonical_form,
    explain,
    load_policy,
    parse_policy,
)

TODAY = dt.date(2026, 6, 1)
FILE = Path("policies/x.toml")
DEFAULT = """\
[defaults]
on_insecure = "hold"

[[secure_domains]]
domain = "gcsx.gov.uk"
subdomains = true
note = "Government Connect"

[[secure_domains]]
domain = "nhs.net"
subdomains = false

[[secure_domains]]
domain = "pnn.police.uk"
subdomains = true
review_by = 2027-03-01
"""

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
label_lists = st.lists(labels, min_size=1, max_size=5)


def policy(text: str = DEFAULT) -> Policy:
    """Parse `text` as the one policy file policies/x.toml."""
    return parse_policy([(FILE, text)])


def entry(domain: str, *, subdomains: bool, extra: str = "") -> str:
    """Write one [[secure_domains]] entry as TOML."""
    flag = "true" if subdomains else "false"
    return f'[[secure_domains]]\ndomain = "{domain}"\nsubdomains = {flag}\n{extra}'


def error_of(*sources: tuple[Path, str]) -> PolicyError:
    """Return the PolicyError that parsing `sources` raises."""
    with pytest.raises(PolicyError) as caught:
        parse_policy(list(sources))
    return caught.value


@pytest.mark.parametrize(
    ("domain", "rule"),
    [
        ("nhs.net", "nhs.net"),
        ("NHS.Net", "nhs.net"),
        ("bromley.gcsx.gov.uk", "*.gcsx.gov.uk"),
        ("a.b.gcsx.gov.uk", "*.gcsx.gov.uk"),
        ("met.pnn.police.uk", "*.pnn.police.uk"),
    ],
)
def test_secure_domains(domain, rule):
    """Exact entries match themselves and subdomain entries match names strictly below."""
    verdict = policy().classify(domain, TODAY)
    assert (verdict.secure, verdict.rule, verdict.reason) == (True, rule, None)


@pytest.mark.parametrize(
    ("domain", "reason"),
    [
        ("evilnhs.net", "insecure_domain"),
        ("nhs.net.example.com", "insecure_domain"),
        ("sub.nhs.net", "insecure_domain"),
        ("gcsx.gov.uk", "insecure_domain"),
        ("evilgcsx.gov.uk", "insecure_domain"),
        ("gov.uk", "insecure_domain"),
        ("net", "insecure_domain"),
        ("gmail.com", "insecure_domain"),
        ("xn--nhs-qla.net", "insecure_domain"),
        ("nhs.xn--nt-nlc", "insecure_domain"),
        ("1.2.3.4", "ip_literal"),
        ("[1.2.3.4]", "ip_literal"),
        ("[IPv6:2001:db8::1]", "ip_literal"),
        ("2001:db8::1", "ip_literal"),
        ("nhs.n\u0435t", "not_a_domain"),
        ("nhs\uff0enet", "not_a_domain"),
        ("nhs\u3002net", "not_a_domain"),
        ("nhs.net.", "not_a_domain"),
        ("nhs..net", "not_a_domain"),
        (".nhs.net", "not_a_domain"),
        ("", "not_a_domain"),
        ("nhs.net ", "not_a_domain"),
        ("x_y.gcsx.gov.uk", "not_a_domain"),
        ("\u212aent.gcsx.gov.uk", "not_a_domain"),
    ],
)
def test_insecure_domains(domain, reason):
    """Look-alikes, wrong levels, IP literals and junk are all insecure."""
    verdict = policy().classify(domain, TODAY)
    assert (verdict.secure, verdict.rule, verdict.reason) == (False, None, reason)


def test_expired_entry_is_insecure():
    """After review_by the entry no longer counts, and the verdict names the entry."""
    verdict = policy().classify("met.pnn.police.uk", dt.date(2027, 3, 2))
    assert (verdict.secure, verdict.rule, verdict.reason) == (
        False,
        "*.pnn.police.uk",
        "entry_expired",
    )


def test_entry_counts_on_its_review_day():
    """On the review_by day itself the entry still counts."""
    assert policy().classify("met.pnn.police.uk", dt.date(2027, 3, 1)).secure


def test_most_specific_entry_decides():
    """When an exact entry and a wider one both match, the exact one decides."""
    text = entry("gcsx.gov.uk", subdomains=True) + entry(
        "old.gcsx.gov.uk", subdomains=False, extra="review_by = 2020-01-01\n"
    )
    verdict = policy(text).classify("old.gcsx.gov.uk", TODAY)
    assert (verdict.secure, verdict.rule, verdict.reason) == (
        False,
        "old.gcsx.gov.uk",
        "entry_expired",
    )
    assert policy(text).classify("new.gcsx.gov.uk", TODAY).secure


def test_defaults_and_fields():
    """Defaults apply and every key of an entry is read."""
    loaded = policy(
        entry(
            "nhs.net",
            subdomains=False,
            extra='note = "n"\nsource = "s"\napproved_by = "a"\nreview_by = 2027-01-02\n',
        )
    )
    assert loaded.on_insecure is OnInsecure.HOLD
    (only,) = loaded.entries
    assert (only.note, only.source, only.approved_by, only.review_by, only.broad) == (
        "n",
        "s",
        "a",
        dt.date(2027, 1, 2),
        False,
    )
    assert (only.file, only.line) == (FILE, 2)


def test_reject_mode():
    """on_insecure = "reject" is read."""
    assert policy('[defaults]\non_insecure = "reject"\n').on_insecure is OnInsecure.REJECT


def test_version_is_sha256_of_canonical_form():
    """The version is the SHA-256 of the documented canonical JSON."""
    loaded = policy()
    expected = json.dumps(
        {
            "on_insecure": "hold",
            "secure_domains": [
                {"domain": "gcsx.gov.uk", "review_by": None, "subdomains": True},
                {"domain": "nhs.net", "review_by": None, "subdomains": False},
                {"domain": "pnn.police.uk", "review_by": "2027-03-01", "subdomains": True},
            ],
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    assert canonical_form(loaded.entries, loaded.on_insecure) == expected
    assert loaded.version == hashlib.sha256(expected).hexdigest()
    assert loaded.short_version == loaded.version[:16]


def test_version_ignores_cosmetics_and_order():
    """Notes and entry order do not change the version; a decision-relevant change does."""
    a = policy(
        entry("nhs.net", subdomains=False, extra='note = "one"\n')
        + entry("gcsx.gov.uk", subdomains=True)
    )
    b = policy(
        entry("gcsx.gov.uk", subdomains=True)
        + entry("nhs.net", subdomains=False, extra='note = "two"\n')
    )
    c = policy(entry("gcsx.gov.uk", subdomains=True) + entry("nhs.net", subdomains=True))
    assert a.version == b.version
    assert a.version != c.version


def test_warnings():
    """Entries due for review within 30 days, expired entries and an empty policy warn."""
    text = (
        entry("nhs.net", subdomains=False, extra="review_by = 2026-06-20\n")
        + entry("gcsx.gov.uk", subdomains=True, extra="review_by = 2026-05-01\n")
        + entry("pnn.police.uk", subdomains=True, extra="review_by = 2026-08-01\n")
    )
    assert policy(text).warnings(TODAY) == (
        "policies/x.toml:2: nhs.net: review_by 2026-06-20 is within 30 days",
        (
            "policies/x.toml:6: gcsx.gov.uk: review_by 2026-05-01 has passed;"
            " the entry no longer counts"
        ),
    )
    empty = policy("")
    assert empty.entries == ()
    assert len(empty.warnings(TODAY)) == 1
    assert not empty.classify("nhs.net", TODAY).secure


def test_broad_entry_allowed_when_marked():
    """A public suffix is accepted with broad = true."""
    loaded = policy(entry("gov.uk", subdomains=True, extra="broad = true\n"))
    assert loaded.classify("anything.gov.uk", TODAY).secure


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[defaults]\non_insecure = "drop"\n', "policies/x.toml:2: defaults.on_insecure"),
        ("[defaults]\nmode = 1\n", "policies/x.toml:2: defaults.mode"),
        ("colour = 1\n", "policies/x.toml:1: colour"),
        (entry("nhs.net", subdomains=False, extra="subdomain = true\n"), "policies/x.toml:4"),
        (entry("nhs.net", subdomains=False, extra='review_by = "soon"\n'), "policies/x.toml:4"),
        (
            entry("nhs.net", subdomains=False, extra="review_by = 2027-01-01T00:00:00\n"),
            "policies/x.toml:4",
        ),
        ('[[secure_domains]]\ndomain = "nhs.net"\nsubdomains = "yes"\n', "policies/x.toml:3"),
        ('[[secure_domains]]\nnote = "x"\n', "policies/x.toml:1"),
        (entry("NHS.net", subdomains=False), "policies/x.toml:2"),
        (entry("nhs.net.", subdomains=False), "policies/x.toml:2"),
        (entry("net", subdomains=False, extra="broad = true\n"), "policies/x.toml:2"),
        (entry("bücher.de", subdomains=False), "policies/x.toml:2"),
        (entry("xn--zz.de", subdomains=False), "policies/x.toml:2"),
        (entry("1.2.3.4", subdomains=False), "policies/x.toml:2"),
        (entry("nhs..net", subdomains=False), "policies/x.toml:2"),
        (entry("gov.uk", subdomains=True), "policies/x.toml:2"),
        (entry("police.uk", subdomains=True), "policies/x.toml:2"),
        (entry("co.uk", subdomains=False), "policies/x.toml:2"),
        (entry("github.io", subdomains=True), "policies/x.toml:2"),
        ("\n\n[[secure_domains]\n", "policies/x.toml:3"),
        (
            entry("nhs.net", subdomains=False) + "\n" + entry("nhs.net", subdomains=True),
            "policies/x.toml:6",
        ),
    ],
)
def test_errors_name_file_and_line(text, where):
    """Every problem in a policy file is a PolicyError naming file and line."""
    error = error_of((FILE, text))
    assert str(error).startswith(where)
    assert isinstance(error, ConfigError)


def test_duplicate_across_files_names_both():
    """A domain listed in two files names both places."""
    error = error_of(
        (Path("a.toml"), entry("nhs.net", subdomains=False)),
        (Path("b.toml"), entry("nhs.net", subdomains=False)),
    )
    assert str(error).startswith("b.toml:2: secure_domains.domain:")
    assert "a.toml:2" in str(error)


def test_defaults_in_two_files_refused():
    """[defaults] may be written in one file only."""
    error = error_of((Path("a.toml"), "[defaults]\n"), (Path("b.toml"), "\n[defaults]\n"))
    assert str(error).startswith("b.toml:2: defaults:")
    assert "a.toml:1" in str(error)


def test_default_policy_file():
    """The shipped policy loads, has no warnings today and matches the SPEC's examples."""
    loaded = load_policy(Path(__file__).parent.parent / "policies" / "secure-domains.toml")
    assert loaded.on_insecure is OnInsecure.HOLD
    assert {e.rule for e in loaded.entries} == {"*.gcsx.gov.uk", "nhs.net", "*.pnn.police.uk"}
    assert loaded.warnings(TODAY) == ()
    assert loaded.classify("bromley.gcsx.gov.uk", TODAY).secure


def test_load_folder_in_name_order(tmp_path):
    """A folder's *.toml files are read in name order; other files are ignored."""
    (tmp_path / "b.toml").write_text(entry("nhs.net", subdomains=False))
    (tmp_path / "a.toml").write_text('[defaults]\non_insecure = "reject"\n')
    (tmp_path / "notes.txt").write_text("not toml")
    loaded = load_policy(tmp_path)
    assert loaded.on_insecure is OnInsecure.REJECT
    assert loaded.entries[0].file == tmp_path / "b.toml"


@pytest.mark.parametrize("name", ["missing.toml", "empty-folder"])
def test_load_problems(tmp_path, name):
    """A missing file or a folder without policy files is a PolicyError naming the path."""
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / name)
    assert str(caught.value).startswith(str(tmp_path / name))


def test_load_not_utf8(tmp_path):
    """A policy file that is not UTF-8 is refused."""
    (tmp_path / "p.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError):
        load_policy(tmp_path / "p.toml")


def test_explain():
    """Explain classifies an address's domain, a bare domain, or gives the address error."""
    loaded = policy()
    secure = explain(loaded, "Someone@NHS.net", TODAY)
    assert (secure.domain, secure.secure, secure.rule, secure.reason) == (
        "nhs.net",
        True,
        "nhs.net",
        None,
    )
    assert explain(loaded, "a%b@nhs.net", TODAY).reason == "routing_in_address"
    assert explain(loaded, "gmail.com", TODAY).reason == "insecure_domain"
    assert explain(loaded, "a@bromley.gcsx.gov.uk", TODAY).rule == "*.gcsx.gov.uk"


@given(label_lists, label_lists, st.booleans())
def test_matching_is_exact_labels(entry_labels, query_labels, subdomains):
    """A domain is secure iff it equals an exact entry or lies strictly below a subdomain entry."""
    entry_labels = [*entry_labels, "example"]
    domain = ".".join(entry_labels)
    loaded = policy(entry(domain, subdomains=subdomains))
    query = ".".join(query_labels)
    n = len(entry_labels)
    if subdomains:
        expected = len(query_labels) > n and query_labels[-n:] == entry_labels
    else:
        expected = query_labels == entry_labels
    assert loaded.classify(query, TODAY).secure == expected


@given(label_lists, labels, st.booleans())
def test_appending_a_label_is_insecure(entry_labels, extra, subdomains):
    """A label appended after any entry never matches it."""
    domain = ".".join([*entry_labels, "example"])
    loaded = policy(entry(domain, subdomains=subdomains))
    assert not loaded.classify(f"{domain}.{extra}", TODAY).secure


@given(label_lists, labels)
def test_prepending_a_label_to_exact_entry_is_insecure(entry_labels, extra):
    """A subdomain of an exact entry is insecure."""
    domain = ".".join([*entry_labels, "example"])
    assert not policy(entry(domain, subdomains=False)).classify(f"{extra}.{domain}", TODAY).secure


@given(label_lists, st.from_regex(r"[a-z0-9-]{1,5}", fullmatch=True), st.booleans())
def test_prefixing_the_first_label_is_insecure(entry_labels, prefix, subdomains):
    """Characters glued to the front of a domain ("evil" + domain) never make it match."""
    domain = ".".join([*entry_labels, "example"])
    loaded = policy(entry(domain, subdomains=subdomains))
    assert not loaded.classify(prefix + domain, TODAY).secure


@given(st.text(min_size=1, max_size=3).filter(lambda s: not s.isascii()), st.data())
def test_non_ascii_anywhere_is_insecure(junk, data):
    """Any non-ASCII character anywhere in the domain makes it insecure."""
    domain = "bromley.gcsx.gov.uk"
    position = data.draw(st.integers(min_value=0, max_value=len(domain)))
    verdict = policy().classify(domain[:position] + junk + domain[position:], TODAY)
    assert (verdict.secure, verdict.reason) == (False, "not_a_domain")


@given(st.text(max_size=40))
def test_classify_never_fails(text):
    """Any string classifies without error, and a secure one is plain lower-case ASCII."""
    verdict = policy().classify(text, TODAY)
    if verdict.secure:
        assert verdict.domain.isascii()
        assert verdict.domain == text.lower()
        assert not verdict.domain.endswith(".")


def test_purposes_vocabulary_maps_header_values():
    """Only vocabulary words are returned; other text is 'unlisted'; no header is None."""
    policy = parse_policy(
        [
            (
                Path("p.toml"),
                '[defaults]\npurposes = ["early_help"]\n[[secure_domains]]\ndomain = "nhs.net"\n',
            )
        ]
    )
    assert policy.purpose(b" Early_Help ") == "early_help"
    assert policy.purpose(b"Jane Smith referral") == "unlisted"
    assert policy.purpose(None) is None


def test_bad_purpose_word_names_file_and_line():
    """A purpose that is not a plain word is refused at its line."""
    with pytest.raises(PolicyError, match=r"p\.toml:2: defaults\.purposes"):
        parse_policy([(Path("p.toml"), '[defaults]\npurposes = ["Early Help"]\n')])
