"""Packaging: the wheel builds, carries its examples, and its command runs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from gateway import __version__
from gateway import config as config_module

ROOT = Path(__file__).resolve().parents[1]
SHARE = ROOT / "gateway" / "share"


def test_shipped_default_policy_is_the_repository_policy():
    """The policy in the package is byte for byte policies/secure-domains.toml."""
    shipped = (SHARE / "secure-domains.toml").read_bytes()
    assert shipped == (ROOT / "policies" / "secure-domains.toml").read_bytes()


def test_shipped_example_config_is_a_valid_config(tmp_path):
    """The example production config passes the strict config check."""
    path = tmp_path / "gateway.toml"
    path.write_bytes((SHARE / "gateway.toml").read_bytes())
    loaded = config_module.load(path)
    assert loaded.server.listen[0].port == 25
    assert loaded.spool_path == Path("/var/lib/gateway/spool")


def test_example_commands_print_the_shipped_files():
    """`gateway example-config` and `example-policy` print the files the wheel carries."""
    for command, name in (
        ("example-config", "gateway.toml"),
        ("example-policy", "secure-domains.toml"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == (SHARE / name).read_text()


def test_version_is_printed():
    """`gateway --version` names the package version."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout.strip() == f"gateway {__version__}"


def test_wheel_builds_with_the_command_and_the_examples(tmp_path):
    """`pip wheel .` gives a wheel with the console script, py.typed and the examples."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gateway/share/gateway.toml" in names
    assert "gateway/share/secure-domains.toml" in names
    assert "gateway/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "gateway = gateway.cli:main" in text
