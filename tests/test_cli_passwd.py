"""`gateway passwd` as an admin runs it: a real subprocess, piped or on a real terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from gateway.passwords import parse_hash, verify_password

COMMAND = [sys.executable, "-m", "gateway.cli", "passwd"]


def passwd(stdin: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run `gateway passwd ARGS…` with `stdin` piped in."""
    return subprocess.run(
        [*COMMAND, *args], input=stdin, capture_output=True, timeout=60, check=False
    )


def hash_from(result: subprocess.CompletedProcess[bytes]) -> str:
    """The one line printed on stdout, checked to be exactly one line."""
    out = result.stdout.decode("ascii")
    assert out.endswith("\n")
    assert out.count("\n") == 1
    return out.removesuffix("\n")


def test_piped_password_prints_a_hash_that_verifies():
    """A piped line becomes a hash that verifies that password and nothing else; exit 0."""
    result = passwd(b"s3cret pass\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    encoded = hash_from(result)
    assert verify_password("s3cret pass", encoded) is True
    assert verify_password("s3cret pass\n", encoded) is False
    assert verify_password("other", encoded) is False


def test_hash_uses_the_default_cost():
    """The printed hash is a valid scrypt hash at the default cost."""
    parsed = parse_hash(hash_from(passwd(b"s3cret\n")))
    assert (parsed.n, parsed.r, parsed.p) == (2**15, 8, 1)


def test_only_the_trailing_newline_is_stripped():
    """Spaces are part of the password; LF, CRLF or no newline at all end it."""
    assert verify_password("  spaced  ", hash_from(passwd(b"  spaced  \n"))) is True
    assert verify_password("crlf", hash_from(passwd(b"crlf\r\n"))) is True
    assert verify_password("no newline", hash_from(passwd(b"no newline"))) is True


def test_only_the_first_line_is_read():
    """Lines after the first are ignored."""
    assert verify_password("first", hash_from(passwd(b"first\nsecond\n"))) is True


def test_decomposed_input_matches_composed_password():
    """A password typed with a combining accent verifies against the composed form."""
    encoded = hash_from(passwd("cafe\u0301\n".encode()))
    assert verify_password("caf\u00e9", encoded) is True


def test_config_is_accepted_but_not_needed(tmp_path):
    """--config is accepted even when the file does not exist; no config is read."""
    result = passwd(b"s3cret\n", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 0, result.stderr
    assert verify_password("s3cret", hash_from(result)) is True


@pytest.mark.parametrize("stdin", [b"", b"\n", b"\r\n"], ids=["nothing", "lf", "crlf"])
def test_empty_password_is_one_line_error(stdin):
    """An empty password prints one error line on stderr, nothing on stdout; exit 1."""
    result = passwd(stdin)
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "empty password" in lines[0]


def test_non_utf8_password_is_one_line_error():
    """Bytes that are not UTF-8 are refused with one line; exit 1."""
    result = passwd(b"caf\xe9\n")
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().strip() == "gateway: the password on stdin is not UTF-8 text"


def run_on_terminal(answers: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run `gateway passwd` with a pseudo-terminal as stdin, answering each prompt in turn."""
    primary, secondary = pty.openpty()
    # A new session has no controlling terminal, so getpass reads the terminal given as stdin
    # and writes its prompts to stderr, where the test can wait for them.
    process = subprocess.Popen(
        COMMAND,
        stdin=secondary,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    os.close(secondary)
    assert process.stderr is not None
    try:
        prompts = b""
        deadline = time.monotonic() + 30
        for count, answer in enumerate(answers, start=1):
            while prompts.count(b"Password") < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no prompt {count}: {prompts!r}"
                ready, _, _ = select.select([process.stderr], [], [], remaining)
                if ready:
                    chunk = os.read(process.stderr.fileno(), 1024)
                    assert chunk, f"stderr closed before prompt {count}: {prompts!r}"
                    prompts += chunk
            os.write(primary, answer.encode() + b"\n")
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(primary)
    return subprocess.CompletedProcess(COMMAND, process.returncode, stdout, prompts + stderr)


def test_terminal_asks_twice_and_prints_the_hash():
    """On a terminal the password is asked twice; matching answers print a hash that verifies."""
    result = run_on_terminal(["typed secret", "typed secret"])
    assert result.returncode == 0, result.stderr
    assert b"Password again" in result.stderr
    assert b"typed secret" not in result.stderr
    assert verify_password("typed secret", hash_from(result)) is True


def test_terminal_answers_that_differ_are_refused():
    """Two different answers on a terminal print one error line and no hash; exit 1."""
    result = run_on_terminal(["typed secret", "typo secret"])
    assert result.returncode == 1
    assert result.stdout == b""
    assert b"the two passwords differ" in result.stderr
    assert b"Traceback" not in result.stderr
