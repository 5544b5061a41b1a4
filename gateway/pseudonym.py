"""Keyed pseudonyms for envelope addresses, so the audit log never holds a local part in clear.

Only a holder of the pseudonym key can ask "was anything sent to X?": they recompute the
pseudonym of X and search for it (`gateway audit search --address X`). The exact form is a
contract with auditors and must not change:

    message   = UTF-8 bytes of  local-part + "@" + domain.lower()
    pseudonym = "p:" + the first 32 lower-case hex digits of HMAC-SHA256(key, message)

The domain is everything after the last "@" and is lower-cased (str.lower); the local part is
kept exactly as given, since RFC 5321 lets a server treat it as case-sensitive. A string with no
"@" (the null reverse-path "", or a bare "postmaster") is hashed as it is. The input is expected
to be the normalised address from the gateway's address parser; this function does no other
normalisation. The same computation with OpenSSL, for a key given as hex:

    printf '%s' 'alice@example.org' | openssl dgst -sha256 -mac HMAC -macopt hexkey:KEYHEX
    # then "p:" + the first 32 hex digits of the output
"""

from __future__ import annotations

import hashlib
import hmac
import re

PREFIX = "p:"
HEX_DIGITS = 32  # 128 bits of the HMAC: collisions are not a practical concern

_FORM = re.compile(r"p:[0-9a-f]{32}")


def pseudonym_message(normalised_address: str) -> bytes:
    """Return the bytes that are keyed-hashed: the address with its domain part lower-cased."""
    local, at, domain = normalised_address.rpartition("@")
    text = f"{local}@{domain.lower()}" if at else normalised_address
    return text.encode("utf-8")


def pseudonym(key: bytes, normalised_address: str) -> str:
    """Return the pseudonym of an address: `p:` and 32 hex digits of its HMAC-SHA256 under key."""
    if not key:
        raise ValueError("the pseudonym key is empty")
    digest = hmac.new(key, pseudonym_message(normalised_address), hashlib.sha256).hexdigest()
    return PREFIX + digest[:HEX_DIGITS]


def is_pseudonym(text: str) -> bool:
    """Tell whether text has the form of a pseudonym (and so cannot be an address)."""
    return _FORM.fullmatch(text) is not None
