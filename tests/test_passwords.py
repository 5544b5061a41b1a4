"""Password hashes: round trips, refusals, the dummy hash and the verified cache."""

from __future__ import annotations

import base64
import unicodedata

import pytest

from gateway.passwords import (
    DEFAULT_N,
    DEFAULT_P,
    DEFAULT_R,
    VerifiedCache,
    dummy_hash,
    hash_password,
    parse_hash,
    verify_password,
)

FAST = 2**14  # the smallest cost allowed, to keep the suite quick
SALT = bytes(range(16))


def b64(data: bytes) -> str:
    """Unpadded URL-safe base64, as the hash format writes it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@pytest.fixture(scope="module")
def encoded() -> str:
    """One valid hash of "correct horse", made once for the module."""
    return hash_password("correct horse", n=FAST)


def test_round_trip_verifies(encoded):
    """A password verifies against its own hash."""
    assert verify_password("correct horse", encoded) is True


def test_wrong_password_is_false(encoded):
    """A wrong password gives False, not an exception."""
    assert verify_password("correct horsf", encoded) is False
    assert verify_password("", encoded) is False


def test_hash_has_the_documented_form(encoded):
    """The hash is scrypt$n$r$p$salt$key with a 16-byte salt and a 32-byte key."""
    parsed = parse_hash(encoded)
    assert encoded.split("$")[:4] == ["scrypt", str(FAST), str(DEFAULT_R), str(DEFAULT_P)]
    assert (parsed.n, parsed.r, parsed.p) == (FAST, DEFAULT_R, DEFAULT_P)
    assert (len(parsed.salt), len(parsed.key)) == (16, 32)
    assert encoded == parsed.encode()


def test_defaults_are_the_documented_cost():
    """The default parameters are n = 2**15, r = 8, p = 1 (32 MiB per derivation)."""
    assert (DEFAULT_N, DEFAULT_R, DEFAULT_P) == (2**15, 8, 1)
    assert 128 * DEFAULT_N * DEFAULT_R == 32 * 2**20


def test_default_cost_round_trip():
    """A hash made with the default parameters verifies and records them."""
    made = hash_password("s3cret")
    assert parse_hash(made).n == DEFAULT_N
    assert verify_password("s3cret", made) is True


def test_given_salt_gives_the_same_hash():
    """With the same salt and parameters the hash is reproducible."""
    assert hash_password("pw", n=FAST, salt=SALT) == hash_password("pw", n=FAST, salt=SALT)


def test_same_password_gets_different_salts():
    """Hashing one password twice draws two different salts."""
    first = parse_hash(hash_password("same", n=FAST))
    second = parse_hash(hash_password("same", n=FAST))
    assert first.salt != second.salt
    assert first.key != second.key


def test_nfc_and_nfd_forms_match():
    """The composed and decomposed spellings of "café" are the same password."""
    nfc = unicodedata.normalize("NFC", "café")
    nfd = unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    made = hash_password(nfd, n=FAST)
    assert verify_password(nfc, made) is True
    assert verify_password(nfd, hash_password(nfc, n=FAST)) is True


def test_empty_password_is_refused():
    """hash_password refuses an empty password."""
    with pytest.raises(ValueError, match="empty"):
        hash_password("")


def test_lone_surrogate_is_refused_by_hash_but_only_false_in_verify(encoded):
    """A password that is not valid Unicode cannot be hashed, and simply fails to verify."""
    with pytest.raises(ValueError, match="Unicode"):
        hash_password("pw\udcff", n=FAST)
    assert verify_password("pw\udcff", encoded) is False


def test_weak_cost_is_refused_when_hashing():
    """hash_password will not make a hash weaker than n = 2**14."""
    with pytest.raises(ValueError, match="power of two"):
        hash_password("pw", n=2**10)


def test_wrong_salt_length_is_refused_when_hashing():
    """hash_password takes only a 16-byte salt."""
    with pytest.raises(ValueError, match="16 bytes"):
        hash_password("pw", n=FAST, salt=b"short")


def _valid_fields() -> list[str]:
    return ["scrypt", str(FAST), "8", "1", b64(SALT), b64(bytes(range(100, 132)))]


def _with(index: int, value: str) -> str:
    fields = _valid_fields()
    fields[index] = value
    return "$".join(fields)


MALFORMED = {
    "empty": "",
    "wrong prefix": _with(0, "bcrypt"),
    "upper-case prefix": _with(0, "SCRYPT"),
    "too few fields": "$".join(_valid_fields()[:5]),
    "too many fields": "$".join([*_valid_fields(), "extra"]),
    "n too weak": _with(1, str(2**10)),
    "n not a power of two": _with(1, str(3 * 2**13)),
    "n too costly": _with(1, str(2**24)),
    "n with a sign": _with(1, "+16384"),
    "n with a leading zero": _with(1, "016384"),
    "n with spaces": _with(1, " 16384"),
    "n not a number": _with(1, "lots"),
    "n in other digits": _with(1, "١٦٣٨٤"),
    "r zero": _with(2, "0"),
    "r too big": _with(2, "64"),
    "p zero": _with(3, "0"),
    "p too big": _with(3, "1000"),
    "n too big for r": _with(2, "1").replace(str(FAST), str(2**16)),
    "salt not base64": _with(4, "not*base64*at*all*here"),
    "salt padded": _with(4, b64(SALT) + "=="),
    "salt standard alphabet": _with(4, base64.b64encode(b"\xfb" * 16).decode().rstrip("=")),
    "salt too short": _with(4, b64(SALT[:8])),
    "salt too long": _with(4, b64(SALT + b"x")),
    "salt non-canonical": _with(4, b64(SALT)[:-1] + "B"),
    "salt empty": _with(4, ""),
    "key too short": _with(5, b64(b"k" * 31)),
    "key too long": _with(5, b64(b"k" * 33)),
    "key not base64": _with(5, "k" * 42 + "!"),
    "trailing newline": "$".join(_valid_fields()) + "\n",
}


def test_the_valid_fields_parse():
    """The base the malformed cases are built from is itself valid."""
    assert parse_hash("$".join(_valid_fields())).salt == SALT


@pytest.mark.parametrize("malformed", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_hash_is_refused_without_echoing_it(malformed):
    """Every kind of malformed hash is a ValueError whose message quotes nothing of it."""
    with pytest.raises(ValueError) as caught:
        parse_hash(malformed)
    message = str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__
    for part in malformed.split("$"):
        if len(part.strip()) >= 3:
            assert part.strip() not in message
    with pytest.raises(ValueError):
        verify_password("anything", malformed)


def test_weak_hash_is_refused():
    """A well-formed hash with n = 2**10 is refused, not verified."""
    weak = _with(1, str(2**10))
    with pytest.raises(ValueError, match="power of two from 2\\*\\*14"):
        parse_hash(weak)


def test_dummy_hash_is_valid_and_cached():
    """The dummy hash parses, costs what a default hash costs, and is the same on every call."""
    parsed = parse_hash(dummy_hash())
    assert (parsed.n, parsed.r, parsed.p) == (DEFAULT_N, DEFAULT_R, DEFAULT_P)
    assert dummy_hash() is dummy_hash()


@pytest.mark.parametrize("password", ["", "password", "correct horse", "café", "x" * 200])
def test_dummy_hash_never_verifies(password):
    """No password verifies against the dummy hash."""
    assert verify_password(password, dummy_hash()) is False


def test_cache_matches_after_remember():
    """A remembered user and password match."""
    cache = VerifiedCache()
    cache.remember("bromley", "s3cret")
    assert cache.matches("bromley", "s3cret") is True


def test_cache_refuses_other_password_or_user():
    """Another password, another user, or a user never remembered do not match."""
    cache = VerifiedCache()
    cache.remember("bromley", "s3cret")
    assert cache.matches("bromley", "s3cre") is False
    assert cache.matches("bromley", "") is False
    assert cache.matches("croydon", "s3cret") is False
    assert cache.matches("", "") is False


def test_cache_forget():
    """After forget the user no longer matches; forgetting an unknown user is harmless."""
    cache = VerifiedCache()
    cache.remember("bromley", "s3cret")
    cache.forget("bromley")
    cache.forget("never-seen")
    assert cache.matches("bromley", "s3cret") is False


def test_cache_normalises_like_the_hash():
    """The cache treats NFC and NFD spellings as one password, as verify_password does."""
    cache = VerifiedCache()
    cache.remember("bromley", unicodedata.normalize("NFD", "café"))
    assert cache.matches("bromley", unicodedata.normalize("NFC", "café")) is True


def test_cache_keeps_no_password_in_clear():
    """Nothing the cache holds contains the password."""
    cache = VerifiedCache()
    cache.remember("bromley", "canary-password")
    assert "canary-password" not in repr(vars(cache))


def test_caches_have_different_keys():
    """Two caches (two processes) cannot check each other's entries."""
    first, second = VerifiedCache(), VerifiedCache()
    first.remember("bromley", "s3cret")
    assert second.matches("bromley", "s3cret") is False


def test_parsed_hash_repr_shows_no_salt_or_key(encoded):
    """A parsed hash that ends up in a log line shows its cost but neither salt nor key."""
    parsed = parse_hash(encoded)
    assert repr(parsed) == f"PasswordHash(n={FAST}, r=8, p=1)"
