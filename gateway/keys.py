"""The gateway's key files: create them once, load them strictly.

A key folder holds six files, made by `gateway keys init`:

    spool.key           32 random bytes: encrypts the spool (losing it loses queued mail)
    pseudonym.key       32 random bytes: the HMAC key of address pseudonyms
    audit-signing.key   Ed25519 private key, PEM PKCS#8, unencrypted: signs audit checkpoints
    audit-signing.pub   Ed25519 public key, PEM SubjectPublicKeyInfo: for auditors
    dkim.key            Ed25519 private key, PEM PKCS#8: DKIM-signs released messages
    dkim.pub            Ed25519 public key, PEM: verifies them offline (also published in DNS)

Every file is 0600 and none is ever overwritten. `keys init` creates whatever is missing, with
one exception: a spool, pseudonym or audit-signing key missing beside other secret keys was
lost, and a new one would not read what the old one protected (a new spool key would make every
queued message unreadable), so init refuses and says to restore it from the backup. The DKIM
pair came later: a folder made before it gets just that pair. Loading refuses a secret file that
group or others may read; a missing dkim.key is not an error (messages go out unsigned).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
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
DKIM_KEY_FILE = "dkim.key"
DKIM_PUBLIC_KEY_FILE = "dkim.pub"
KEY_FILES = (
    SPOOL_KEY_FILE,
    PSEUDONYM_KEY_FILE,
    SIGNING_KEY_FILE,
    PUBLIC_KEY_FILE,
    DKIM_KEY_FILE,
    DKIM_PUBLIC_KEY_FILE,
)
SECRET_FILES = (SPOOL_KEY_FILE, PSEUDONYM_KEY_FILE, SIGNING_KEY_FILE, DKIM_KEY_FILE)
# Keys whose loss init must not paper over: a new one cannot read what the old one protected.
_IRREPLACEABLE = (SPOOL_KEY_FILE, PSEUDONYM_KEY_FILE, SIGNING_KEY_FILE)
_PUBLIC_FILE_OF = {SIGNING_KEY_FILE: PUBLIC_KEY_FILE, DKIM_KEY_FILE: DKIM_PUBLIC_KEY_FILE}
SECRET_KEY_LENGTH = 32

_INIT_HINT = "run `gateway keys init`"


@dataclass(frozen=True)
class Keys:
    """The gateway's secret keys, loaded from one key folder."""

    spool_key: bytes = field(repr=False)
    pseudonym_key: bytes = field(repr=False)
    signing_key: Ed25519PrivateKey = field(repr=False)
    dkim_key: Ed25519PrivateKey | None = field(default=None, repr=False)  # None: send unsigned

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


def dkim_dns_record(keys: Keys) -> str:
    """The TXT record to publish at `<selector>._domainkey.<domain>` for the DKIM key."""
    if keys.dkim_key is None:
        raise KeyStoreError(f"no {DKIM_KEY_FILE} in the key folder; {_INIT_HINT}")
    return dkim_record_for(keys.dkim_key.public_key())


def dkim_record_for(public_key: Ed25519PublicKey) -> str:
    """The DKIM key record of an Ed25519 public key (RFC 8463: the raw 32 bytes in base64)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_keys(folder: Path) -> Keys:
    """Create every missing key file in `folder`, never replacing one and never a lost key.

    Refuses when every file exists, when a public key file exists without its private key, and
    when a spool, pseudonym or audit-signing key is missing beside another secret key.
    """
    present = {name for name in KEY_FILES if os.path.lexists(folder / name)}
    if present == set(KEY_FILES):
        raise KeyStoreError(
            f"{folder}: every key file already exists; refusing to overwrite keys "
            "(the spool key decrypts queued mail)"
        )
    held = [name for name in SECRET_FILES if name in present]
    lost = [name for name in _IRREPLACEABLE if name not in present]
    if held and lost:
        raise KeyStoreError(
            f"{folder / lost[0]}: missing while {held[0]} exists; refusing to create a new one "
            "(a new key cannot read what the lost one protected, such as queued mail); "
            "restore it from the backup of the key folder"
        )
    for private, public in _PUBLIC_FILE_OF.items():
        if public in present and private not in present:
            raise KeyStoreError(
                f"{folder / public}: already exists without {private}; refusing to make a key "
                f"it does not match (restore {private} from the backup, or remove {public})"
            )
    if held:
        keys = load_keys(folder)  # the keys we keep must be sound before anything is added
    else:
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyStoreError(f"{folder}: cannot create key folder: {exc.strerror}") from exc
        keys = Keys(secrets.token_bytes(32), secrets.token_bytes(32), Ed25519PrivateKey.generate())
    if keys.dkim_key is None:
        keys = dataclasses.replace(keys, dkim_key=Ed25519PrivateKey.generate())
    contents = {name: data for name, data in _file_contents(keys).items() if name not in present}
    _create_all(folder, contents)
    return keys


def _file_contents(keys: Keys) -> dict[str, bytes]:
    contents = {
        SPOOL_KEY_FILE: keys.spool_key,
        PSEUDONYM_KEY_FILE: keys.pseudonym_key,
        SIGNING_KEY_FILE: _private_pem(keys.signing_key),
        PUBLIC_KEY_FILE: _public_pem(keys.public_key),
    }
    if keys.dkim_key is not None:
        contents[DKIM_KEY_FILE] = _private_pem(keys.dkim_key)
        contents[DKIM_PUBLIC_KEY_FILE] = _public_pem(keys.dkim_key.public_key())
    return contents


def _create_all(folder: Path, contents: dict[str, bytes]) -> None:
    """Create each file exclusively; on any failure remove the ones this call made."""
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


def read_secret_key(path: Path) -> bytes:
    """One raw 32-byte key file (e.g. the pseudonym key for `audit search --address`)."""
    return _read_raw_key(path)


def load_keys(folder: Path) -> Keys:
    """Load the secret keys from `folder`; each public key file, if present, must match.

    A missing dkim.key gives `Keys.dkim_key` None; every other key file must exist.
    """
    spool_key = _read_raw_key(folder / SPOOL_KEY_FILE)
    pseudonym_key = _read_raw_key(folder / PSEUDONYM_KEY_FILE)
    signing_key = _load_private_key(folder / SIGNING_KEY_FILE)
    dkim_path = folder / DKIM_KEY_FILE
    dkim_key = _load_private_key(dkim_path) if os.path.lexists(dkim_path) else None
    for name, key in ((SIGNING_KEY_FILE, signing_key), (DKIM_KEY_FILE, dkim_key)):
        public_path = folder / _PUBLIC_FILE_OF[name]
        if key is not None and public_path.exists():
            published = load_public_key(public_path)
            if _public_pem(published) != _public_pem(key.public_key()):
                raise KeyStoreError(f"{public_path}: does not match {folder / name}")
    return Keys(spool_key, pseudonym_key, signing_key, dkim_key)


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read_secret(path), None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyStoreError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyStoreError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file (audit-signing.pub or dkim.pub)."""
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
