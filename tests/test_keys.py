import stat

import pytest

from gateway.errors import KeyStoreError
from gateway.keys import (
    KEY_FILES,
    PSEUDONYM_KEY_FILE,
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    SPOOL_KEY_FILE,
    init_keys,
    load_keys,
    load_public_key,
    public_key_pem,
)

SECRET_FILES = (SPOOL_KEY_FILE, PSEUDONYM_KEY_FILE, SIGNING_KEY_FILE)


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


def test_load_returns_the_created_keys(tmp_path):
    """Loading gives back the same keys that init created."""
    created = init_keys(tmp_path)
    loaded = load_keys(tmp_path)
    assert loaded.spool_key == created.spool_key
    assert loaded.pseudonym_key == created.pseudonym_key
    assert loaded.key_id == created.key_id
    assert len(loaded.key_id) == 16


def test_keys_repr_hides_secrets(tmp_path):
    """The repr of Keys shows no key material."""
    keys = init_keys(tmp_path)
    assert keys.spool_key.hex() not in repr(keys)
    assert str(keys.spool_key) not in repr(keys)


@pytest.mark.parametrize("existing", KEY_FILES)
def test_init_refuses_to_overwrite(tmp_path, existing):
    """Init refuses when any key file exists and leaves that file untouched."""
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


@pytest.mark.parametrize("name", SECRET_FILES)
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
