"""Password hashes for SMTP AUTH: make, check, verify (SPEC sections 2, 4 and 7).

A hash is one line, written by `gateway passwd` and kept in `[[clients]].auth_password_hash`:

    scrypt$<n>$<r>$<p>$<salt>$<key>

`n`, `r`, `p` are scrypt's cost, block size and parallelism in decimal; `salt` (16 bytes) and
`key` (32 bytes) are unpadded URL-safe base64. The defaults (n = 2**15, r = 8, p = 1) need
128 * n * r = 32 MiB of memory and tens of milliseconds of CPU per derivation: cheap for one
agency server logging in, dear for anyone guessing. Hashes weaker than n = 2**14 are refused.

Passwords are text: they are NFC-normalised, then encoded as UTF-8, so the same typed password
matches whichever way the keyboard composed its accents.

Everything here is pure but for `os.urandom`. Deriving is CPU-bound and blocking: async callers
run `verify_password` in a thread.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import unicodedata
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

SCHEME = "scrypt"
DEFAULT_N = 2**15  # with DEFAULT_R: 32 MiB and tens of milliseconds per derivation
DEFAULT_R = 8
DEFAULT_P = 1
MIN_N = 2**14  # refuse anything weaker
MAX_N = 2**20
MAX_R = 32
MAX_P = 16
MAX_MEMORY = 2**30  # 128 * n * r bytes: a typo in a config must not cost gigabytes per login
SALT_BYTES = 16
KEY_BYTES = 32

_NUMBER = re.compile(r"[1-9][0-9]{0,9}")
_BASE64 = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class PasswordHash:
    """A parsed password hash: scrypt parameters, salt and derived key (kept out of repr)."""

    n: int
    r: int
    p: int
    salt: bytes = field(repr=False)
    key: bytes = field(repr=False)

    def encode(self) -> str:
        """The one-line form kept in the config file."""
        return "$".join(
            (SCHEME, str(self.n), str(self.r), str(self.p), _b64(self.salt), _b64(self.key))
        )


def hash_password(
    password: str,
    *,
    n: int = DEFAULT_N,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
    salt: bytes | None = None,
) -> str:
    """Hash `password` with scrypt and a fresh random salt (or `salt`, for tests)."""
    if not password:
        raise ValueError("the password is empty")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the password is not valid Unicode text") from None
    _check_parameters(n, r, p)
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    if len(salt) != SALT_BYTES:
        raise ValueError(f"the salt must be {SALT_BYTES} bytes")
    key = _derive(password, n=n, r=r, p=p, salt=salt)
    return PasswordHash(n=n, r=r, p=p, salt=salt, key=key).encode()


def parse_hash(encoded: str) -> PasswordHash:
    """Parse and check a hash; ValueError (never quoting the hash) when it is malformed."""
    fields = encoded.split("$")
    if len(fields) != 6 or fields[0] != SCHEME:
        raise ValueError(
            "malformed password hash: not in the form written by `gateway passwd` "
            "(six fields separated by '$', the first naming the scheme)"
        )
    _, n_text, r_text, p_text, salt_text, key_text = fields
    n = _number(n_text, "n")
    r = _number(r_text, "r")
    p = _number(p_text, "p")
    _check_parameters(n, r, p)
    salt = _unb64(salt_text, SALT_BYTES, "salt")
    key = _unb64(key_text, KEY_BYTES, "key")
    return PasswordHash(n=n, r=r, p=p, salt=salt, key=key)


def verify_password(password: str, encoded: str) -> bool:
    """True when `password` matches the hash; False otherwise; ValueError for a malformed hash."""
    expected = parse_hash(encoded)
    actual = _derive(password, n=expected.n, r=expected.r, p=expected.p, salt=expected.salt)
    return hmac.compare_digest(actual, expected.key)


@functools.cache
def dummy_hash() -> str:
    """A valid hash of a random password, for unknown users: as slow as a real check, never true."""
    return hash_password(_b64(os.urandom(32)))


class VerifiedCache:
    """Credentials verified recently, kept only as keyed HMACs so a login skips scrypt.

    The key is random and lives only in this process: the cache holds no password, nor anything
    that can be checked against one outside the process. Build a new cache (or `forget` a user)
    whenever that user's hash in the config changes.
    """

    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._verified: dict[str, bytes] = {}

    def _mac(self, username: str, password: str) -> bytes:
        message = username.encode("utf-8", "surrogatepass") + b"\0" + _password_bytes(password)
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def remember(self, username: str, password: str) -> None:
        """Record that `password` was verified for `username`."""
        self._verified[username] = self._mac(username, password)

    def matches(self, username: str, password: str) -> bool:
        """True only for the user and password last remembered, compared in constant time."""
        actual = self._mac(username, password)
        expected = self._verified.get(username)
        if expected is None:
            return False
        return hmac.compare_digest(actual, expected)

    def forget(self, username: str) -> None:
        """Drop whatever is remembered for `username`."""
        self._verified.pop(username, None)


def _password_bytes(password: str) -> bytes:
    # surrogatepass: a password decoded with surrogateescape can still be checked (and fail)
    # instead of raising; hash_password refuses such passwords outright.
    return unicodedata.normalize("NFC", password).encode("utf-8", "surrogatepass")


def _derive(password: str, *, n: int, r: int, p: int, salt: bytes) -> bytes:
    kdf = Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p)
    return kdf.derive(_password_bytes(password))


def _check_parameters(n: int, r: int, p: int) -> None:
    if n < MIN_N or n > MAX_N or n & (n - 1):
        raise ValueError(
            "password hash: n must be a power of two from 2**14 to 2**20 "
            "(make a new hash with `gateway passwd`)"
        )
    if not 1 <= r <= MAX_R:
        raise ValueError(f"password hash: r must be from 1 to {MAX_R}")
    if not 1 <= p <= MAX_P:
        raise ValueError(f"password hash: p must be from 1 to {MAX_P}")
    # scrypt requires n < 2**(16 r); the memory cap keeps one login from costing gigabytes.
    if n >= 2 ** (16 * r) or 128 * n * r > MAX_MEMORY:
        raise ValueError("password hash: n and r together are out of range")


def _number(text: str, name: str) -> int:
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"malformed password hash: {name} is not a positive decimal number")
    return int(text)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, size: int, name: str) -> bytes:
    problem = f"malformed password hash: {name} is not {size} bytes of unpadded URL-safe base64"
    if not _BASE64.fullmatch(text):
        raise ValueError(problem)
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise ValueError(problem) from None
    if len(data) != size or _b64(data) != text:  # the second test refuses non-canonical forms
        raise ValueError(problem)
    return data
