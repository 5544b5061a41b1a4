import pytest

from gateway.pseudonym import is_pseudonym, pseudonym, pseudonym_message

KEY = bytes(range(32))


def test_matches_openssl_hmac_of_address_with_lowercased_domain():
    """The pseudonym is "p:" and the first 32 hex digits of HMAC-SHA256, as OpenSSL computes it."""
    # printf '%s' 'Alice.Smith@example.org' | openssl dgst -sha256 -mac HMAC -macopt hexkey:0001..1f
    expected = "p:eeeff184530399faf6eef1c38579c529"
    assert expected == pseudonym(KEY, "Alice.Smith@EXAMPLE.org")


def test_domain_case_does_not_matter():
    """Addresses differing only in the case of their domain have the same pseudonym."""
    assert pseudonym(KEY, "bob@NHS.Net") == pseudonym(KEY, "bob@nhs.net")


def test_local_part_case_matters():
    """The local part is kept as given, since RFC 5321 lets it be case-sensitive."""
    assert pseudonym(KEY, "Bob@nhs.net") != pseudonym(KEY, "bob@nhs.net")


def test_only_the_part_after_the_last_at_is_lowercased():
    """The message hashed lower-cases only the domain after the last "@"."""
    assert pseudonym_message('"A@B"@Example.ORG') == b'"A@B"@example.org'


def test_address_without_at_is_hashed_as_is():
    """The null reverse-path and bare postmaster are hashed unchanged."""
    assert pseudonym_message("") == b""
    assert pseudonym_message("Postmaster") == b"Postmaster"
    assert is_pseudonym(pseudonym(KEY, ""))


def test_different_keys_give_different_pseudonyms():
    """Only a holder of the key can recompute a pseudonym."""
    assert pseudonym(KEY, "bob@nhs.net") != pseudonym(b"another key", "bob@nhs.net")


def test_empty_key_is_refused():
    """An empty key would make pseudonyms guessable by anyone, so it is refused."""
    with pytest.raises(ValueError, match="empty"):
        pseudonym(b"", "bob@nhs.net")


def test_form_check_accepts_pseudonyms_only():
    """is_pseudonym accepts the exact form and rejects addresses and near misses."""
    assert is_pseudonym(pseudonym(KEY, "bob@nhs.net"))
    assert not is_pseudonym("bob@nhs.net")
    assert not is_pseudonym("p:" + "A" * 32)
    assert not is_pseudonym("p:" + "a" * 33)
