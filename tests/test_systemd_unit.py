"""The systemd unit, user and folders, checked by systemd's own tools (Debian's `systemd`).

`systemd-analyze verify` needs every Exec*= command to exist; /usr/bin/gateway is not installed
on a test machine, so it verifies a copy whose commands point at this Python instead (only the
path changes). `systemd-analyze security --offline=yes` reads the real file. Neither needs
systemd running as PID 1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.keys import KEY_FILES

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "gateway.service"
SYSUSERS = SYSTEMD / "gateway.sysusers"
TMPFILES = SYSTEMD / "gateway.tmpfiles"
MAX_EXPOSURE = 2.0
ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}


def tool(name: str) -> str:
    """The path of a systemd tool, or skip: the Makefile's test-deps installs Debian's systemd."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package systemd; `make test-deps`)")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output."""
    return subprocess.run(
        args, capture_output=True, text=True, errors="replace", env=ENV, check=False, timeout=60
    )


def service_settings() -> list[tuple[str, str]]:
    """The unit's [Service] assignments, in order (comments and other sections left out)."""
    section = ""
    found = []
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith(("#", ";")) and section == "[Service]":
            key, _, value = line.partition("=")
            found.append((key, value))
    return found


def setting(key: str) -> list[str]:
    """Every value given for `key` in [Service]."""
    return [value for k, value in service_settings() if k == key]


def entry(database: Path, name: str) -> list[str]:
    """The fields of `name`'s line in a passwd or group file."""
    for line in database.read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise LookupError(f"{name} not in {database}")


def test_unit_verifies(tmp_path):
    """`systemd-analyze verify` reports nothing about the unit (unknown keys, bad values)."""
    analyze = tool("systemd-analyze")
    copy = tmp_path / UNIT.name  # the unit's name comes from the file name
    copy.write_text(UNIT.read_text().replace("/usr/bin/gateway", sys.executable))
    result = run(analyze, "verify", "--recursive-errors=no", str(copy))
    output = result.stdout + result.stderr
    about_unit = [line for line in output.splitlines() if UNIT.name in line or str(copy) in line]
    assert result.returncode == 0, output
    assert about_unit == [], output


def test_unit_exposure_is_low():
    """`systemd-analyze security --offline=yes` rates the unit's exposure 2.0 or lower."""
    analyze = tool("systemd-analyze")
    result = run(
        analyze,
        "security",
        "--offline=yes",
        "--no-pager",
        f"--threshold={round(MAX_EXPOSURE * 10)}",
        str(UNIT),
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for gateway\.service: (\d+\.\d+)", output)
    assert match is not None, output
    assert float(match[1]) <= MAX_EXPOSURE, output
    assert result.returncode == 0, output


def test_unit_is_a_watched_notify_service():
    """The unit waits for READY=1, accepts it from the main process only, and runs a watchdog."""
    assert setting("Type") == ["notify"]
    assert setting("NotifyAccess") == ["main"]
    assert setting("WatchdogSec") == ["30"]
    assert setting("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert setting("Restart") == ["on-failure"]
    assert setting("User") == setting("Group") == ["gateway"]


def test_unit_binds_port_25_with_one_capability():
    """CAP_NET_BIND_SERVICE is the only capability, and no private user namespace voids it."""
    assert setting("CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]
    assert setting("AmbientCapabilities") == ["CAP_NET_BIND_SERVICE"]
    assert setting("PrivateUsers") in ([], ["no"])


def test_unit_loads_every_key_file_as_a_credential():
    """Each key file is a credential named as the key loader expects, from /etc/gateway/keys."""
    credentials = dict(value.split(":", 1) for value in setting("LoadCredential"))
    assert set(KEY_FILES) == set(credentials)
    assert {f"/etc/gateway/keys/{name}" for name in KEY_FILES} == set(credentials.values())


def test_sysusers_makes_the_service_user(tmp_path):
    """systemd-sysusers makes user and group gateway, home /var/lib/gateway, no login shell."""
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = run(sysusers, f"--root={tmp_path}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    name, _, uid, gid, gecos, home, shell = entry(tmp_path / "etc/passwd", "gateway")
    assert (name, gecos, home) == ("gateway", "Secure transfer gateway", "/var/lib/gateway")
    assert shell.endswith("nologin")
    assert uid == gid == entry(tmp_path / "etc/group", "gateway")[2]


@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles needs root to set owners")
def test_tmpfiles_makes_private_key_folders(tmp_path):
    """systemd-tmpfiles makes /etc/gateway/keys and tls mode 0700, owned by the service user."""
    sysusers = tool("systemd-sysusers")
    tmpfiles = tool("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    assert run(sysusers, f"--root={tmp_path}", str(SYSUSERS)).returncode == 0
    result = run(tmpfiles, f"--root={tmp_path}", "--create", str(TMPFILES))
    assert result.returncode == 0, result.stderr
    uid = int(entry(tmp_path / "etc/passwd", "gateway")[2])
    for name in ("keys", "tls"):
        info = (tmp_path / "etc/gateway" / name).stat()
        assert (oct(info.st_mode & 0o7777), info.st_uid) == (oct(0o700), uid)
