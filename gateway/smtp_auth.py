"""Who the client is: SMTP AUTH credentials and client-certificate pins.

A connection is matched to a configured client by its address first (the greeting). A client
configured with `auth_username` must then also authenticate, and one with
`tls_client_fingerprint` must present that certificate; until then MAIL gets 530 5.7.0.

Password checks cost an scrypt derivation (tens of milliseconds, 32 MiB), run off the event
loop and at most `max_parallel` at a time. A wrong user name costs the same as a wrong password
(the client's own hash is checked either way), so replies and timing do not reveal which names
exist. A successful
check is remembered as a keyed hash, so an agency's next connection costs no scrypt; a wrong
password always pays the full price.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ssl
from typing import Any

from aiosmtpd.smtp import AuthResult

from gateway import replies
from gateway.config import Client
from gateway.logconfig import get_logger
from gateway.passwords import VerifiedCache, dummy_hash, verify_password

log = get_logger("smtp_auth")


class Authenticator:
    """Checks SMTP AUTH credentials against the client the connection came from."""

    def __init__(self, *, max_parallel: int = 2) -> None:
        self._cache = VerifiedCache()
        self._slots = asyncio.Semaphore(max_parallel)

    async def check(self, client: Client | None, login: bytes, password: bytes) -> bool:
        """True when `login`/`password` are this client's configured credentials."""
        try:
            user = login.decode("utf-8")
            secret = password.decode("utf-8")
        except UnicodeDecodeError:
            user, secret = "", ""
        if client is None or client.auth_username is None or client.auth_password_hash is None:
            async with self._slots:  # the same cost as a real check
                await asyncio.to_thread(verify_password, secret, dummy_hash())
            return False
        user_ok = hmac.compare_digest(user.encode("utf-8"), client.auth_username.encode("utf-8"))
        # The cache key names the client and its hash: a changed hash forgets old successes.
        cache_key = f"{client.name}\0{client.auth_password_hash}\0{user}"
        if user_ok and self._cache.matches(cache_key, secret):
            return True
        async with self._slots:
            # A wrong user name is checked against the client's own hash too, so it costs
            # exactly what a wrong password does.
            matched = await asyncio.to_thread(verify_password, secret, client.auth_password_hash)
        if matched and user_ok:
            self._cache.remember(cache_key, secret)
            return True
        return False


def certificate_fingerprint(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """`sha256:` and the hex digest of the peer's certificate (DER), or None without one."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return "sha256:" + hashlib.sha256(der).hexdigest()


def identity_missing(client: Client, *, authenticated: bool, fingerprint: str | None) -> str | None:
    """What this client has yet to prove before MAIL, as a reason code; None when nothing."""
    if client.auth_username is not None and not authenticated:
        return "auth_required"
    pinned = client.tls_client_fingerprint
    if pinned is not None and (fingerprint is None or not hmac.compare_digest(pinned, fingerprint)):
        return "client_certificate_required"
    return None


class AuthMechanisms:
    """SMTP AUTH PLAIN and LOGIN for `GatewaySMTP`, checked by the shared `Authenticator`.

    aiosmtpd finds these `auth_*` methods on the session; its own versions call a synchronous
    authenticator, while the scrypt check here runs off the event loop.
    """

    # Provided by aiosmtpd's SMTP and by GatewaySMTP, which this is mixed into.
    inbound: Any
    client: Any
    push: Any
    challenge_auth: Any
    _client_name: Any
    AuthLoginUsernameChallenge: Any
    AuthLoginPasswordChallenge: Any

    async def auth_PLAIN(self, _server: Any, args: list[str]) -> AuthResult:
        """RFC 4616: one blob `authzid NUL authcid NUL password`, inline or after a 334."""
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                await self.push(replies.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push(replies.AUTH_BAD_BASE64)
            return AuthResult(success=False, handled=True)
        return await self._authenticate_async("PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, _server: Any, args: list[str]) -> AuthResult:
        """The LOGIN mechanism: user name and password each after a 334 challenge."""
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
        else:
            try:
                login = base64.b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                await self.push(replies.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        if not isinstance(login, bytes):
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._authenticate_async("LOGIN", login, password)

    async def _authenticate_async(
        self, mechanism: str, login: bytes, password: bytes
    ) -> AuthResult:
        if await self.inbound.authenticator.check(self.client, login, password):
            log.info("client_authenticated", client=self._client_name(), mechanism=mechanism)
            return AuthResult(success=True, auth_data=self._client_name())
        log.warning("auth_failed", client=self._client_name(), mechanism=mechanism)
        self.inbound.metrics.message_refused("auth_failed")
        return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)
