"""A private Postfix instance as an agency mail server that relays through the gateway.

Debian's Postfix, run from a config folder and queue of its own (`instance_root()`): it never
reads /etc/postfix/main.cf nor touches the system's queue. Its smtpd listens on a loopback port
of its own; everything it receives goes to `relayhost = [localhost]:<gateway port>` with
`smtp_tls_security_level = secure` (the gateway's certificate must verify against the test CA
and match the name "localhost", which only /etc/hosts resolves: DNS is off) and, optionally,
SMTP AUTH from a `texthash:` password map (no postmap needed). It logs to a plain file
(`maillog_file`, through postlogd), so no syslog is needed.

The instance folder is not under pytest's tmp_path: that lies in /tmp/pytest-of-root, mode
0700, and Postfix's master opens its lock file as the unprivileged `postfix` user, who must be
able to traverse every parent folder. `remove()` copies the log and config into the test's
tmp_path for a post-mortem, then deletes the instance.

`start()` is `postfix -c <config> set-permissions` (creates the queue folders with the owners
Postfix checks) and `postfix -c <config> start`; `stop()` is `postfix -c <config> stop`, then
SIGKILL to the master's process group by the pid in its pid file should it still run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

POSTFIX = Path("/usr/sbin/postfix")

# Every service runs unchrooted (the instance folder has no copy of /etc); only the
# services a relay-only instance uses. The smtpd listener line is added by `write_config`.
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def available() -> bool:
    """Whether Debian's Postfix is installed here."""
    return POSTFIX.exists()


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def instance_root() -> Path:
    """A new folder for one instance, which the `postfix` user may traverse but not list."""
    root = Path(tempfile.mkdtemp(prefix="gateway-postfix-"))
    root.chmod(0o711)
    return root


@dataclass
class PostfixAgency:
    """One private Postfix instance under `root`."""

    root: Path
    gateway_port: int
    ca_pem: Path
    sasl_username: str | None = None
    sasl_password: str | None = None
    smtpd_port: int = 0

    @property
    def config_dir(self) -> Path:
        """The instance's own config folder (main.cf, master.cf)."""
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        """The instance's own queue."""
        return self.root / "queue"

    @property
    def maillog(self) -> Path:
        """The log file postlogd writes."""
        return self.root / "maillog"

    def write_config(self) -> None:
        """Write main.cf, master.cf and the SASL password map; make the queue folders."""
        if not self.smtpd_port:
            self.smtpd_port = free_port()
        self.config_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.queue_dir, self.root / "data"):
            folder.mkdir(exist_ok=True)
        shutil.chown(self.root / "data", "postfix", "postfix")
        ca_copy = self.config_dir / "ca.pem"
        shutil.copyfile(self.ca_pem, ca_copy)
        ca_copy.chmod(0o644)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.root / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "mail.bromley.gcsx.gov.uk",
            "mydomain": "bromley.gcsx.gov.uk",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "local_transport": "error:5.1.1 no local delivery in this instance",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "biff": "no",
            # Only /etc/hosts: "localhost" is 127.0.0.1 and is the name on the gateway's cert.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "relayhost": f"[localhost]:{self.gateway_port}",
            "smtp_tls_security_level": "secure",
            "smtp_tls_secure_cert_match": "nexthop",
            "smtp_tls_CAfile": str(ca_copy),
            "smtp_tls_loglevel": "1",
            "smtp_tls_session_cache_database": "",
            # One delivery attempt now, then quick retries: tests wait seconds, not minutes.
            "queue_run_delay": "5s",
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "10s",
            "smtp_connect_timeout": "10s",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
        }
        if self.sasl_username is not None:
            password_map = self.config_dir / "sasl_passwd"
            password_map.write_text(
                f"[localhost]:{self.gateway_port} {self.sasl_username}:{self.sasl_password}\n"
            )
            password_map.chmod(0o600)
            settings |= {
                "smtp_sasl_auth_enable": "yes",
                "smtp_sasl_password_maps": f"texthash:{password_map}",
                "smtp_sasl_security_options": "noanonymous",
                "smtp_sasl_tls_security_options": "noanonymous",
                "smtp_sasl_mechanism_filter": "plain, login",
            }
        main_cf = "".join(f"{key} = {value}\n" for key, value in settings.items())
        (self.config_dir / "main.cf").write_text(main_cf)
        listener = f"127.0.0.1:{self.smtpd_port} inet n - n - - smtpd\n"
        (self.config_dir / "master.cf").write_text(listener + MASTER_CF)

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, MAIL_CONFIG=str(self.config_dir))
        return subprocess.run(
            [str(POSTFIX), "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    def start(self, timeout: float = 30) -> None:
        """Create the queue (`set-permissions`), start the master, wait for smtpd's port."""
        for step in (("set-permissions",), ("start",)):
            done = self._postfix(*step)
            if done.returncode != 0:
                msg = f"postfix {step[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                raise RuntimeError(msg + self.log_text())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.smtpd_port), timeout=1).close()
                return
            time.sleep(0.05)
        msg = f"postfix smtpd did not listen on 127.0.0.1:{self.smtpd_port}\n"
        raise RuntimeError(msg + self.log_text())

    def master_pid(self) -> int | None:
        """The master's pid from its pid file, if any."""
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 30) -> None:
        """`postfix stop` (which waits for the master); SIGKILL whatever still runs."""
        pid = self.master_pid()
        stopped = False
        with contextlib.suppress(subprocess.TimeoutExpired):
            stopped = self._postfix("stop", timeout=timeout).returncode == 0
        if pid is None:
            return
        deadline = time.monotonic() + (timeout if stopped else 0)
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid) and _command(pid) == "master":
            # The master leads its own process group, with every daemon it started.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def remove(self, keep: Path) -> None:
        """Copy the log and config files into `keep` (for a post-mortem); delete the instance."""
        keep.mkdir(parents=True, exist_ok=True)
        for path in (self.maillog, self.config_dir / "main.cf", self.config_dir / "master.cf"):
            with contextlib.suppress(OSError):
                shutil.copyfile(path, keep / path.name)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        """Everything Postfix has logged so far."""
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Poll the log until `pattern` matches (blocking: run it in a thread)."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = compiled.search(self.log_text())
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                msg = f"no {pattern!r} in Postfix's log within {timeout} s:\n{self.log_text()}"
                raise TimeoutError(msg)
            time.sleep(0.1)


def _command(pid: int) -> str:
    """The process's command name ("master" for Postfix's master), or "" if unknown."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purposes; /proc tells.
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/status").read_text()
        if "\nState:\tZ" in status:
            return False
    return True
