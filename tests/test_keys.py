import base64
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import KeyStoreError
from gateway.keys import (
    DKIM_KEY_FILE,
    DKIM_PUBLIC_KEY_FILE,
    KEY_FILES,
    PSEUDONYM_KEY_FILE,
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    SPOOL_KEY_FILE,
    dkim_dns_record,
    init_keys,
    load_keys,
    load_public_key,
    public_key_pem,
)

SECRET_FILES = (SPOOL_KEY_FILE, PSEUDONYM_KEY_FILE, SIGNING_KEY_FILE, DKIM_KEY_FILE)
REQUIRED_SECRET_FILES = (SPOOL_KEY_FILE, PSEUDONYM_KEY_FILE, SIGNING_KEY_FILE)


def test_init_creates_private_files_and_folder(tmp_path):
    """Init makes a 0700 folder and 0600 key files of the documented forms."""
    folder = tmp_path / "keys"
    keys = init_keys(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == sorted(KEY_FILES)
    for name in KEY_FILES:
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert (folder / SPOOL_KEY_FILE).read_bytes() == keys.spool_key
    assert len(keys.pseudonym_key) == 32
    assert (folder / SIGNING_KEY_FILE).read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (folder / PUBLIC_KEY_FILE).read_text() == public_key_pem(keys)
    assert (folder / DKIM_KEY_FILE).read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert keys.dkim_key is not None
    assert load_public_key(folder / DKIM_PUBLIC_KEY_FILE) == keys.dkim_key.public_key()


def test_load_returns_the_created_keys(tmp_path):
    """Loading gives back the same keys that init created."""
    created = init_keys(tmp_path)
    loaded = load_keys(tmp_path)
    assert loaded.spool_key == created.spool_key
    assert loaded.pseudonym_key == created.pseudonym_key
    assert loaded.key_id == created.key_id
    assert len(loaded.key_id) == 16
    assert created.dkim_key is not None
    assert loaded.dkim_key is not None
    assert loaded.dkim_key.public_key() == created.dkim_key.public_key()


def test_keys_repr_hides_secrets(tmp_path):
    """The repr of Keys shows no key material."""
    keys = init_keys(tmp_path)
    assert keys.spool_key.hex() not in repr(keys)
    assert str(keys.spool_key) not in repr(keys)


@pytest.mark.parametrize("existing", KEY_FILES)
def test_init_refuses_a_lone_key_file(tmp_path, existing):
    """A key file alone means the others were lost: init refuses, names it, leaves it be."""
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(KeyStoreError, match=existing):
        init_keys(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_bytes() == b"precious"


def test_second_init_refuses(tmp_path):
    """Running init twice keeps the first keys."""
    first = init_keys(tmp_path)
    with pytest.raises(KeyStoreError, match="refusing to overwrite"):
        init_keys(tmp_path)
    assert load_keys(tmp_path).spool_key == first.spool_key


@pytest.mark.parametrize("name", SECRET_FILES)
def test_load_refuses_group_readable_secret(tmp_path, name):
    """A secret file readable by others is refused with a message naming it."""
    init_keys(tmp_path)
    (tmp_path / name).chmod(0o644)
    with pytest.raises(KeyStoreError, match=rf"{name}: readable by group or others \(mode 0644\)"):
        load_keys(tmp_path)


@pytest.mark.parametrize("name", REQUIRED_SECRET_FILES)
def test_load_refuses_missing_file(tmp_path, name):
    """One key missing beside the others is named, with the advice to restore it."""
    init_keys(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(KeyStoreError, match=rf"{name}: missing; restore it from the backup"):
        load_keys(tmp_path)


def test_load_of_an_empty_key_folder_says_to_run_keys_init(tmp_path):
    """With no keys at all, the error names the command that creates them."""
    with pytest.raises(KeyStoreError, match=r"missing; run `gateway keys init`"):
        load_keys(tmp_path)


def test_load_refuses_wrong_length(tmp_path):
    """A raw key of the wrong length is refused."""
    init_keys(tmp_path)
    (tmp_path / PSEUDONYM_KEY_FILE).write_bytes(b"short")
    with pytest.raises(KeyStoreError, match=rf"{PSEUDONYM_KEY_FILE}: wrong length"):
        load_keys(tmp_path)


def test_load_refuses_bad_pem(tmp_path):
    """A signing key file that is not PEM is refused."""
    init_keys(tmp_path)
    (tmp_path / SIGNING_KEY_FILE).write_text("not a key\n")
    with pytest.raises(KeyStoreError, match=SIGNING_KEY_FILE):
        load_keys(tmp_path)


def test_load_refuses_mismatched_public_key(tmp_path):
    """A public key file from another key pair is refused."""
    init_keys(tmp_path / "a")
    other = init_keys(tmp_path / "b")
    (tmp_path / "a" / PUBLIC_KEY_FILE).write_text(public_key_pem(other))
    with pytest.raises(KeyStoreError, match="does not match"):
        load_keys(tmp_path / "a")


def test_public_key_alone_verifies_signatures(tmp_path):
    """An auditor verifies a signature with the .pub file alone."""
    keys = init_keys(tmp_path / "keys")
    auditor_copy = tmp_path / "auditor.pub"
    auditor_copy.write_bytes((tmp_path / "keys" / PUBLIC_KEY_FILE).read_bytes())
    signature = keys.signing_key.sign(b"checkpoint")
    load_public_key(auditor_copy).verify(signature, b"checkpoint")


def test_load_public_key_refuses_private_key(tmp_path):
    """A file that is not an Ed25519 public key is refused by name."""
    init_keys(tmp_path)
    with pytest.raises(KeyStoreError, match=SIGNING_KEY_FILE):
        load_public_key(tmp_path / SIGNING_KEY_FILE)


def _old_folder(folder):
    """Make a key folder as init made it before DKIM keys existed."""
    init_keys(folder)
    (folder / DKIM_KEY_FILE).unlink()
    (folder / DKIM_PUBLIC_KEY_FILE).unlink()


def test_load_without_dkim_key_gives_none(tmp_path):
    """A folder made before DKIM signing loads, with no DKIM key."""
    _old_folder(tmp_path)
    keys = load_keys(tmp_path)
    assert keys.dkim_key is None
    assert len(keys.spool_key) == 32


def test_init_of_an_old_folder_adds_only_the_dkim_pair(tmp_path):
    """Init gives a pre-DKIM folder a 0600 DKIM pair and leaves the old files as they were."""
    _old_folder(tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    keys = init_keys(tmp_path)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    assert sorted(set(after) - set(before)) == [DKIM_KEY_FILE, DKIM_PUBLIC_KEY_FILE]
    assert {name: after[name] for name in before} == before
    for name in (DKIM_KEY_FILE, DKIM_PUBLIC_KEY_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert keys.spool_key == before[SPOOL_KEY_FILE][0]
    loaded = load_keys(tmp_path)
    assert loaded.dkim_key is not None
    assert keys.dkim_key is not None
    assert loaded.dkim_key.public_key() == keys.dkim_key.public_key()


@pytest.mark.parametrize("lost", REQUIRED_SECRET_FILES)
def test_init_refuses_to_replace_a_lost_key(tmp_path, lost):
    """A spool, pseudonym or audit-signing key missing beside the others is never made anew."""
    init_keys(tmp_path)
    (tmp_path / lost).unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyStoreError, match=rf"{lost}: missing while .* restore it from"):
        init_keys(tmp_path)
    assert before == sorted(p.name for p in tmp_path.iterdir())


def test_init_refuses_a_lost_spool_key_in_an_old_folder(tmp_path):
    """A pre-DKIM folder that also lost its spool key gets nothing, not even the DKIM pair."""
    _old_folder(tmp_path)
    (tmp_path / SPOOL_KEY_FILE).unlink()
    with pytest.raises(KeyStoreError, match=rf"{SPOOL_KEY_FILE}: missing"):
        init_keys(tmp_path)
    assert not (tmp_path / SPOOL_KEY_FILE).exists()
    assert not (tmp_path / DKIM_KEY_FILE).exists()


def test_init_refuses_a_dkim_public_key_without_its_private_key(tmp_path):
    """A dkim.pub left without dkim.key is not paired with a new key it does not match."""
    init_keys(tmp_path)
    (tmp_path / DKIM_KEY_FILE).unlink()
    published = (tmp_path / DKIM_PUBLIC_KEY_FILE).read_bytes()
    with pytest.raises(KeyStoreError, match=rf"{DKIM_PUBLIC_KEY_FILE}: already exists without"):
        init_keys(tmp_path)
    assert not (tmp_path / DKIM_KEY_FILE).exists()
    assert published == (tmp_path / DKIM_PUBLIC_KEY_FILE).read_bytes()


def test_init_rebuilds_a_missing_public_key_from_its_private_key(tmp_path):
    """A missing audit-signing.pub is written again from the private key that is kept."""
    keys = init_keys(tmp_path)
    (tmp_path / PUBLIC_KEY_FILE).unlink()
    init_keys(tmp_path)
    assert public_key_pem(keys) == (tmp_path / PUBLIC_KEY_FILE).read_text()


def test_init_checks_the_kept_keys_before_adding(tmp_path):
    """An old folder with a group-readable spool key is refused before any DKIM key is made."""
    _old_folder(tmp_path)
    (tmp_path / SPOOL_KEY_FILE).chmod(0o640)
    with pytest.raises(KeyStoreError, match="readable by group or others"):
        init_keys(tmp_path)
    assert not (tmp_path / DKIM_KEY_FILE).exists()


def test_load_refuses_mismatched_dkim_public_key(tmp_path):
    """A dkim.pub from another key pair is refused."""
    init_keys(tmp_path / "a")
    init_keys(tmp_path / "b")
    (tmp_path / "a" / DKIM_PUBLIC_KEY_FILE).write_bytes(
        (tmp_path / "b" / DKIM_PUBLIC_KEY_FILE).read_bytes()
    )
    with pytest.raises(KeyStoreError, match=rf"{DKIM_PUBLIC_KEY_FILE}: does not match"):
        load_keys(tmp_path / "a")


def test_load_refuses_a_dkim_key_of_another_type(tmp_path):
    """A dkim.key that is PEM but not Ed25519 is refused by name."""
    init_keys(tmp_path)
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / DKIM_KEY_FILE).write_bytes(other)
    with pytest.raises(KeyStoreError, match=rf"{DKIM_KEY_FILE}: not an Ed25519 private key"):
        load_keys(tmp_path)


def test_dkim_dns_record_is_the_rfc_8463_form(tmp_path):
    """The TXT record holds the raw 32-byte Ed25519 public key in base64, as RFC 8463 says."""
    keys = init_keys(tmp_path)
    record = dkim_dns_record(keys)
    prefix = "v=DKIM1; k=ed25519; p="
    assert record.startswith(prefix)
    assert keys.dkim_key is not None
    raw = keys.dkim_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert raw == base64.b64decode(record.removeprefix(prefix), validate=True)
    assert len(record) == len(prefix) + 44


def test_dkim_dns_record_without_a_dkim_key(tmp_path):
    """Asking for the DNS record of a folder without a DKIM key says to run keys init."""
    _old_folder(tmp_path)
    with pytest.raises(KeyStoreError, match=r"no dkim\.key .* run `gateway keys init`"):
        dkim_dns_record(load_keys(tmp_path))
