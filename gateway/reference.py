"""Decision references (SPEC section 5): `SG-` and a 26-character ULID.

A ULID is 128 bits: a 48-bit count of milliseconds since the Unix epoch, then 80 random bits,
written big-endian in Crockford base32 (digits and upper-case letters without I, L, O, U), so
references sort by time, cannot be guessed and are safe to read aloud.
"""

from __future__ import annotations

import datetime as dt
import os
import re

PREFIX = "SG-"
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
LENGTH = len(PREFIX) + 26
RANDOM_BYTES = 10

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MILLISECOND = dt.timedelta(milliseconds=1)
_MAX_MS = (1 << 48) - 1
_PATTERN = re.compile(rf"{PREFIX}[0-7][{ALPHABET}]{{25}}")


def new_reference(now: dt.datetime, random: bytes | None = None) -> str:
    """Make a reference for `now` (timezone-aware); `random` is 10 bytes, os.urandom by default."""
    if now.tzinfo is None:
        raise ValueError("the time of a reference must be timezone-aware")
    millis = (now - _EPOCH) // _MILLISECOND
    if not 0 <= millis <= _MAX_MS:
        raise ValueError("the time is outside the range of a ULID")
    entropy = os.urandom(RANDOM_BYTES) if random is None else random
    if len(entropy) != RANDOM_BYTES:
        raise ValueError(f"a reference needs exactly {RANDOM_BYTES} random bytes")
    value = (millis << 80) | int.from_bytes(entropy, "big")
    chars = [ALPHABET[(value >> shift) & 0x1F] for shift in range(125, -1, -5)]
    return PREFIX + "".join(chars)


def is_reference(text: str) -> bool:
    """Tell whether `text` is a reference in its canonical (upper-case) form."""
    return _PATTERN.fullmatch(text) is not None


def reference_time(ref: str) -> dt.datetime:
    """Return the UTC time, to the millisecond, at which reference `ref` was made."""
    if not is_reference(ref):
        raise ValueError("not a decision reference")
    value = 0
    for char in ref[len(PREFIX) :]:
        value = (value << 5) | ALPHABET.index(char)
    return _EPOCH + (value >> 80) * _MILLISECOND
