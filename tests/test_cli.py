"""The `gateway` command as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import make_setup


def gateway(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `gateway ARGS…` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        check=False,
    )


@pytest.fixture
def setup(tmp_path, ca):
    """A complete gateway config with keys (no daemon running)."""
    return make_setup(tmp_path, ca, receiver_port=2)


def test_policy_check_accepts_the_default_policy(setup):
    """A valid config and policy: exit 0 and a summary naming the policy version."""
    result = gateway("policy", "check", "--config", str(setup.config_path))
    assert result.returncode == 0, result.stderr
    assert "3 secure domain entries" in result.stdout
    assert "Traceback" not in result.stderr


def test_policy_check_names_file_and_line_of_an_unknown_policy_key(setup):
    """A misspelt policy key is one line naming file, line and key; exit 1."""
    setup.write_policy(text='[[secure_domains]]\ndomain = "nhs.net"\nsubdomain = true\n')
    result = gateway("policy", "check", "--config", str(setup.config_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "secure-domains.toml:3" in lines[0]
    assert "subdomain" in lines[0]


def test_policy_check_names_file_and_line_of_an_unknown_config_key(setup):
    """A misspelt config key is one line naming the config file and line; exit 1."""
    text = setup.config_path.read_text().replace("[spool]\n", "[spool]\nmax_size = 3\n")
    setup.config_path.write_text(text)
    result = gateway("policy", "check", "--config", str(setup.config_path))
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line
    assert f"{setup.config_path}:" in line
    assert "spool.max_size: unknown key" in line


def test_policy_check_on_bad_toml_is_one_line(setup):
    """Broken TOML syntax is one line with the file and line, never a traceback."""
    setup.write_policy(text='[[secure_domains]\ndomain = "nhs.net"\n')
    result = gateway("policy", "check", "--config", str(setup.config_path))
    assert result.returncode == 1
    assert "secure-domains.toml:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_named(tmp_path):
    """A config path that does not exist is named in one line; exit 1."""
    result = gateway("policy", "check", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "nope.toml" in result.stderr
    assert "config file not found" in result.stderr


def test_explain_says_which_rule_makes_a_domain_secure(setup):
    """Explain: secure addresses name their rule; exit 0 when all are secure."""
    result = gateway(
        "policy",
        "explain",
        "a@nhs.net",
        "b@bromley.gcsx.gov.uk",
        "--config",
        str(setup.config_path),
    )
    assert result.returncode == 0, result.stderr
    assert "a@nhs.net: secure" in result.stdout
    assert "b@bromley.gcsx.gov.uk: secure" in result.stdout


def test_explain_json_lists_each_address_and_exits_1_when_any_is_insecure(setup):
    """Explain --json: objects with address, domain, secure, rule, reason; exit 1 if insecure."""
    result = gateway(
        "policy",
        "explain",
        "a@nhs.net",
        "b@evilnhs.net",
        "c@nhs.net.example.com",
        "--json",
        "--config",
        str(setup.config_path),
    )
    assert result.returncode == 1
    rows = json.loads(result.stdout)
    assert [r["address"] for r in rows] == ["a@nhs.net", "b@evilnhs.net", "c@nhs.net.example.com"]
    assert [r["secure"] for r in rows] == [True, False, False]
    assert rows[0]["rule"] == "nhs.net"
    assert rows[1]["reason"] == "insecure_domain"
    assert set(rows[0]) == {"address", "domain", "secure", "rule", "reason"}


def test_usage_error_exits_2(setup):
    """An unknown subcommand is a usage error: exit 2, one line, no traceback."""
    result = gateway("policy", "frobnicate", "--config", str(setup.config_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_keys_init_refuses_to_overwrite_existing_keys(setup):
    """Keys already exist (made by the set-up): init refuses and says so; exit 1."""
    result = gateway("keys", "init", "--config", str(setup.config_path))
    assert result.returncode == 1
    assert "exist" in result.stderr


def test_keys_init_creates_keys_and_prints_the_public_key(setup):
    """On a fresh key folder init makes private files and prints a PEM public key."""
    text = setup.config_path.read_text().replace('path = "keys"', 'path = "newkeys"')
    setup.config_path.write_text(text)
    result = gateway("keys", "init", "--config", str(setup.config_path))
    assert result.returncode == 0, result.stderr
    assert "BEGIN PUBLIC KEY" in result.stdout
    modes = {p.name: p.stat().st_mode & 0o777 for p in (setup.root / "newkeys").iterdir()}
    assert modes["spool.key"] == 0o600
    assert modes["pseudonym.key"] == 0o600


def test_queue_list_on_an_empty_spool(setup):
    """An empty spool lists as an empty JSON list."""
    (setup.root / "spool").mkdir()
    result = gateway("queue", "list", "--json", "--config", str(setup.config_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_queue_show_of_an_unknown_ref_is_one_line(setup):
    """An unknown reference is a clear error, exit 1."""
    (setup.root / "spool").mkdir()
    result = gateway(
        "queue", "show", "SG-01KAWY5Q3J0V6N9XK1M2T4R8BC", "--config", str(setup.config_path)
    )
    assert result.returncode == 1
    assert "SG-01KAWY5Q3J0V6N9XK1M2T4R8BC" in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_dkim_record_prints_the_txt_record_again(setup):
    """The DKIM record can be printed again at any time, from the public key alone."""
    result = gateway("keys", "dkim-record", "--config", str(setup.config_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        'gateway._domainkey.gateway.test. IN TXT "v=DKIM1; k=ed25519; p='
    )
