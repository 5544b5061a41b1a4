"""The gateway's key files: create them once, load them strictly.

A key folder holds four files, made by `gateway keys init`:

    spool.key           32 random bytes: encrypts the spool (losing it loses queued mail)
    pseudonym.key       32 random bytes: the HMAC key of address pseudonyms
    audit-signing.key   Ed25519 private key, PEM PKCS#8, unencrypted: signs audit checkpoints
    audit-signing.pub   Ed25519 public key, PEM SubjectPublicKeyInfo: for auditors

Secret files are 0600 and are never overwritten: a new spool key would make every queued
message unreadable. Loading refuses a secret file that group or others may read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import KeyStoreError

SPOOL_KEY_FILE = "spool.key"
PSEUDONYM_KEY_FILE = "pseudonym.key"
SIGNING_KEY_FILE = "audit-signing.key"
PUBLIC_KEY_FILE = "audit-signing.pub"
KEY_FILES = (SPOOL_KEY_FILE, PSEUDONYM_KEY_FILE, SIGNING_KEY_FILE, PUBLIC_KEY_FILE)
SECRET_KEY_LENGTH = 32

_INIT_HINT = "run `gateway keys init`"


@dataclass(frozen=True)
class Keys:
    """The gateway's secret keys, loaded from one key folder."""

    spool_key: bytes = field(repr=False)
    pseudonym_key: bytes = field(repr=False)
    signing_key: Ed25519PrivateKey = field(repr=False)

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The audit-signing public key."""
        return self.signing_key.public_key()

    @property
    def key_id(self) -> str:
        """First 16 hex digits of the SHA-256 of the raw 32-byte public key."""
        raw = self.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(keys: Keys) -> str:
    """Return the audit-signing public key as PEM SubjectPublicKeyInfo text."""
    return _public_pem(keys.public_key).decode("ascii")


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def init_keys(folder: Path) -> Keys:
    """Create a key folder with fresh keys; refuse if any key file already exists."""
    existing = [name for name in KEY_FILES if (folder / name).exists()]
    if existing:
        raise KeyStoreError(
            f"{folder / existing[0]}: already exists; refusing to overwrite keys "
            "(the spool key decrypts queued mail)"
        )
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyStoreError(f"{folder}: cannot create key folder: {exc.strerror}") from exc
    signing_key = Ed25519PrivateKey.generate()
    keys = Keys(secrets.token_bytes(32), secrets.token_bytes(32), signing_key)
    contents = {
        SPOOL_KEY_FILE: keys.spool_key,
        PSEUDONYM_KEY_FILE: keys.pseudonym_key,
        SIGNING_KEY_FILE: signing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        PUBLIC_KEY_FILE: _public_pem(keys.public_key),
    }
    created: list[Path] = []
    path = folder
    try:
        for name, data in contents.items():
            path = folder / name
            _create_exclusive(path, data)
            created.append(path)
        _fsync_dir(folder)
    except OSError as exc:
        for done in created:
            with contextlib.suppress(OSError):
                done.unlink()
        if isinstance(exc, FileExistsError):
            raise KeyStoreError(f"{path}: already exists; refusing to overwrite keys") from exc
        raise KeyStoreError(f"{path}: cannot write key: {exc.strerror}") from exc
    return keys


def _create_exclusive(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file, fsync it, and link it to `path` unless that exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # unlike rename, link never replaces an existing file
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_secret(path: Path) -> bytes:
    """Read a secret key file, refusing one that group or others may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError as exc:
        siblings = [p for p in KEY_FILES if (path.parent / p).exists()]
        hint = (
            "restore it from the backup of the key folder (keys init never replaces keys)"
            if siblings
            else _INIT_HINT
        )
        raise KeyStoreError(f"{path}: missing; {hint}") from exc
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot open: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise KeyStoreError(f"{path}: not a regular file")
        if mode & 0o077:
            raise KeyStoreError(
                f"{path}: readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                f"run `chmod 600 {path}`"
            )
        return file.read()


def _read_raw_key(path: Path) -> bytes:
    data = _read_secret(path)
    if len(data) != SECRET_KEY_LENGTH:
        raise KeyStoreError(
            f"{path}: wrong length ({len(data)} bytes, expected {SECRET_KEY_LENGTH})"
        )
    return data


def load_keys(folder: Path) -> Keys:
    """Load the secret keys from `folder`; the public key file, if present, must match."""
    spool_key = _read_raw_key(folder / SPOOL_KEY_FILE)
    pseudonym_key = _read_raw_key(folder / PSEUDONYM_KEY_FILE)
    signing_path = folder / SIGNING_KEY_FILE
    try:
        signing_key = serialization.load_pem_private_key(_read_secret(signing_path), None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyStoreError(f"{signing_path}: not an unencrypted PEM private key") from exc
    if not isinstance(signing_key, Ed25519PrivateKey):
        raise KeyStoreError(f"{signing_path}: not an Ed25519 private key")
    keys = Keys(spool_key, pseudonym_key, signing_key)
    public_path = folder / PUBLIC_KEY_FILE
    if public_path.exists():
        published = load_public_key(public_path)
        if _public_pem(published) != _public_pem(keys.public_key):
            raise KeyStoreError(f"{public_path}: does not match {signing_path}")
    return keys


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an audit-signing public key from a PEM file (all an auditor needs)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyStoreError(f"{path}: missing") from exc
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyStoreError(f"{path}: not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyStoreError(f"{path}: not an Ed25519 public key")
    return key
