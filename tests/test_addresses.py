import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.addresses import Address, MailPath, parse_address, parse_path
from gateway.errors import AddressError

ATEXT = string.ascii_letters + string.digits + "#$&'*+/^_`{|}~-"
labels = st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True)
domains = st.builds(
    lambda parts, tld: ".".join([*parts, tld]),
    st.lists(labels, min_size=1, max_size=4),
    st.sampled_from(["net", "uk", "org", "com"]),
)
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=10)
locals_ = st.lists(atoms, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)


def reason_of(argument: str, **kwargs: bool) -> str:
    """Return the reason code of the AddressError that parsing `argument` raises."""
    with pytest.raises(AddressError) as caught:
        parse_path(argument, **kwargs)
    return caught.value.reason


def test_plain_path_parses():
    """A plain path gives the local part as sent and the domain in lower case."""
    assert parse_path("<Jane.Doe@NHS.net>") == MailPath(Address("Jane.Doe", "nhs.net"), ())


def test_normalised_form():
    """The normalised form joins the local part and the A-label domain."""
    assert Address("Jane", "nhs.net").normalised == "Jane@nhs.net"


def test_leading_space_allowed():
    """Real clients send `MAIL FROM: <x>`, so spaces before the bracket are allowed."""
    assert parse_path("  <a@nhs.net>").address == Address("a", "nhs.net")


def test_null_path():
    """The null path gives no address and keeps its parameters."""
    assert parse_path("<> SIZE=10") == MailPath(None, (("SIZE", "10"),))


def test_params_upper_cased_and_looked_up():
    """Parameter keywords are upper-cased; values and bare keywords can be looked up."""
    path = parse_path("<a@nhs.net> size=1234 SmtpUtf8 BODY=8BITMIME")
    assert path.params == (("SIZE", "1234"), ("SMTPUTF8", None), ("BODY", "8BITMIME"))
    assert path.param("size") == "1234"
    assert path.param("SMTPUTF8") is None
    assert path.has("smtputf8")
    assert not path.has("RET")
    assert path.param("RET") is None


def test_smtputf8_from_own_params():
    """A non-ASCII address is accepted on MAIL that carries SMTPUTF8 and becomes an A-label."""
    path = parse_path("<Jöhn@bücher.de> SMTPUTF8")
    assert path.address == Address("Jöhn", "xn--bcher-kva.de")


def test_smtputf8_from_transaction():
    """On RCPT the caller says whether the transaction declared SMTPUTF8."""
    assert parse_path("<a@bücher.de>", smtputf8=True).address == Address("a", "xn--bcher-kva.de")
    assert reason_of("<a@bücher.de> SMTPUTF8", smtputf8=False) == "smtputf8_required"


@pytest.mark.parametrize(
    ("argument", "reason"),
    [
        ("a@nhs.net", "bad_syntax"),
        ("<a@nhs.net", "bad_syntax"),
        ("<a@nhs.net>junk", "bad_syntax"),
        ("<a(comment)@nhs.net>", "bad_syntax"),
        ("<a @nhs.net>", "bad_syntax"),
        ("<a@nhs.net >", "bad_syntax"),
        ("<a\u00a0@nhs.net>", "bad_syntax"),
        ("<=?utf-8?q?a?=@nhs.net>", "bad_syntax"),
        ("<@relay.example:a@nhs.net>", "routing_in_address"),
        ("<@a,@b:x@y.com>", "routing_in_address"),
        ("<a%gmail.com@nhs.net>", "routing_in_address"),
        ("<gmail.com!a@nhs.net>", "routing_in_address"),
        ('<"a@gmail.com"@nhs.net>', "routing_in_address"),
        ("<a@gmail.com@nhs.net>", "routing_in_address"),
        ('<"a b"@nhs.net>', "bad_syntax"),
        ("<a@[1.2.3.4]>", "ip_literal"),
        ("<a@[IPv6:2001:db8::1]>", "ip_literal"),
        ("<a@1.2.3.4>", "ip_literal"),
        ("<a\x00@nhs.net>", "bad_syntax"),
        ("<a\r\n@nhs.net>", "bad_syntax"),
        ("<a\x7f@nhs.net>", "bad_syntax"),
        ("<a\\b@nhs.net>", "bad_syntax"),
        ("<a\udc80@nhs.net>", "invalid_utf8"),
        ("<a@nhs.net> SIZE=\udcff", "invalid_utf8"),
        ("<jöhn@nhs.net>", "smtputf8_required"),
        ("<a@bücher.de>", "smtputf8_required"),
        ("<" + "a" * 65 + "@nhs.net>", "too_long"),
        ("<a@" + ("b" * 60 + ".") * 5 + "uk>", "too_long"),
        ("<" + "a" * 64 + "@" + ("b" * 49 + ".") * 4 + "uk>", "too_long"),
        ("<a@nhs.net.>", "bad_syntax"),
        ("<a@nhs..net>", "bad_syntax"),
        ("<a@.nhs.net>", "bad_syntax"),
        ("<a@" + "b" * 64 + ".net>", "bad_syntax"),
        ("<a@-nhs.net>", "bad_syntax"),
        ("<a@nhs-.net>", "bad_syntax"),
        ("<a@nhs_x.net>", "bad_syntax"),
        ("<.a@nhs.net>", "bad_syntax"),
        ("<a.@nhs.net>", "bad_syntax"),
        ("<a..b@nhs.net>", "bad_syntax"),
        ("<@nhs.net>", "routing_in_address"),
        ("<a@>", "bad_syntax"),
        ("<anhs.net>", "bad_syntax"),
        ("<a@xn--zz.com>", "bad_syntax"),
        ("<a@nhs.net> SIZE=1 size=2", "bad_syntax"),
        ("<a@nhs.net> =1", "bad_syntax"),
        ("<a@nhs.net> SIZE=a=b", "bad_syntax"),
        ("<a@nhs.net> SIZE=", "bad_syntax"),
        ("<a@nhs.net> X=é", "bad_syntax"),
    ],
)
def test_refused(argument, reason):
    """Each malformed or tricky argument is refused with its stable reason code."""
    assert reason_of(argument) == reason


@pytest.mark.parametrize(
    "argument",
    [
        "<a@nhs\u3002net> SMTPUTF8",
        "<a@nhs\uff0enet> SMTPUTF8",
        "<a@nhs\uff61net> SMTPUTF8",
        "<a@nhs\uff0enet>",
        "<a@\uff4e\uff48\uff53.net> SMTPUTF8",
        "<a@NHS\u200b.net> SMTPUTF8",
    ],
)
def test_unicode_dots_and_compatibility_forms_refused(argument):
    """Unicode dots and fullwidth letters are refused, never mapped to ASCII."""
    assert reason_of(argument) == "bad_syntax"


def test_lookalike_parses_to_its_own_a_label():
    """A Cyrillic look-alike parses to its own A-label, which is not the real domain."""
    address = parse_path("<a@nhs.n\u0435t> SMTPUTF8").address
    assert address is not None
    assert address.domain.startswith("nhs.xn--")


def test_non_nfc_local_refused():
    """A local part not in NFC is refused rather than silently normalised."""
    assert reason_of("<jo\u0308hn@nhs.net> SMTPUTF8") == "bad_syntax"


def test_error_detail_has_no_personal_data():
    """The error text never repeats the local part."""
    with pytest.raises(AddressError) as caught:
        parse_path("<secretname%x@nhs.net>")
    assert "secretname" not in str(caught.value)


def test_parse_address_bare():
    """A bare address parses with the same rules; brackets are refused."""
    assert parse_address("A@NHS.NET") == Address("A", "nhs.net")
    with pytest.raises(AddressError):
        parse_address("<a@nhs.net>")
    with pytest.raises(AddressError) as caught:
        parse_address("a@bücher.de")
    assert caught.value.reason == "smtputf8_required"
    assert parse_address("a@bücher.de", smtputf8=True).domain == "xn--bcher-kva.de"


@given(local=locals_, domain=domains)
def test_valid_address_round_trips(local, domain):
    """Any generated valid address parses back to exactly its local part and domain."""
    path = parse_path(f"<{local}@{domain}>")
    assert path == MailPath(Address(local, domain), ())


@given(local=locals_, domain=domains)
def test_domain_is_lower_cased(local, domain):
    """Upper-case domains come out lower case; the local part keeps its case."""
    address = parse_address(f"{local}@{domain.upper()}")
    assert address == Address(local, domain)


@given(
    local=locals_,
    domain=domains,
    bad=st.sampled_from(["%", "!", "\\", "\x00", "\t", "\r", "\n", "\x7f", " ", '"', "(", "\x1b"]),
    data=st.data(),
)
def test_forbidden_characters_never_accepted(local, domain, bad, data):
    """Inserting %, !, backslash, a control character or white space anywhere is refused."""
    text = f"{local}@{domain}"
    position = data.draw(st.integers(min_value=0, max_value=len(text)))
    with pytest.raises(AddressError):
        parse_path(f"<{text[:position]}{bad}{text[position:]}>", smtputf8=True)


@given(st.text(max_size=80))
def test_arbitrary_text_only_raises_address_error(text):
    """Any text either parses to a clean address or raises AddressError, nothing else."""
    try:
        path = parse_path(text)
    except AddressError:
        return
    if path.address is not None:
        assert not set('%!\\ "()') & set(path.address.local)
        assert path.address.domain.isascii()
        assert path.address.domain == path.address.domain.lower()


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40), domains)
def test_arbitrary_local_parts_with_smtputf8(local, domain):
    """Any Unicode local part either parses unchanged or raises AddressError."""
    try:
        path = parse_path(f"<{local}@{domain}> SMTPUTF8")
    except AddressError:
        return
    assert path.address == Address(local, domain)
