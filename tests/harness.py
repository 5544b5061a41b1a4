"""A whole gateway for end-to-end tests: config on disk, keys, certificates, a running daemon.

The daemon runs either in the test's own event loop (`running_gateway`) or as a real
subprocess (`GatewayProcess`, for crash and restart tests). Both listen on 127.0.0.1 port 0;
the bound port is read from the daemon itself (in-process) or from its `daemon_started` log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from gateway import config as config_module
from gateway.daemon import Daemon
from gateway.keys import init_keys

# Short-lived folders for control sockets, removed when the test session ends (conftest).
CONTROL_DIRS: list[str] = []

DEFAULT_POLICY = """
[defaults]
on_insecure = "{on_insecure}"
purposes = ["child_protection", "early_help"]

[[secure_domains]]
domain = "gcsx.gov.uk"
subdomains = true

[[secure_domains]]
domain = "nhs.net"
subdomains = false

[[secure_domains]]
domain = "pnn.police.uk"
subdomains = true
"""


@dataclass
class GatewaySetup:
    """Files of one test gateway."""

    root: Path
    config_path: Path
    ca_pem: Path
    client_context: ssl.SSLContext
    extra_config: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def config(self) -> config_module.Config:
        """The parsed config."""
        return config_module.load(self.config_path)

    def write_policy(self, on_insecure: str = "hold", text: str | None = None) -> None:
        """Write the policy file (the default three domains unless `text` is given)."""
        body = text if text is not None else DEFAULT_POLICY.format(on_insecure=on_insecure)
        (self.root / "policies" / "secure-domains.toml").write_text(body)


def make_setup(
    root: Path,
    ca: trustme.CA,
    *,
    receiver_port: int,
    route_host: str = "127.0.0.1",
    tls_name: str = "localhost",
    on_insecure: str = "hold",
    server_extra: str = "",
    delivery_extra: str = "",
    client_extra: str = "",
) -> GatewaySetup:
    """Write a complete gateway config under `root`, with keys and a trustme certificate."""
    (root / "tls").mkdir(parents=True)
    (root / "policies").mkdir()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(root / "tls" / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(root / "tls" / "cert.pem"))
    ca.cert_pem.write_to_path(str(root / "tls" / "ca.pem"))
    routes = "".join(
        f"""
[[delivery.routes]]
domain = "{domain}"
subdomains = {sub}
host = "{route_host}"
port = {receiver_port}
tls_name = "{tls_name}"
"""
        for domain, sub in (
            ("nhs.net", "false"),
            ("gcsx.gov.uk", "true"),
            ("pnn.police.uk", "true"),
        )
    )
    control_dir = tempfile.mkdtemp(prefix="gw-")
    CONTROL_DIRS.append(control_dir)
    config_text = f"""
[server]
hostname = "gateway.test"
listen = ["127.0.0.1:0"]
tls_cert = "tls/cert.pem"
tls_key = "tls/key.pem"
{server_extra}

[spool]
path = "spool"

[audit]
path = "audit"

[keys]
path = "keys"

[policy]
path = "policies"

[control]
socket = "{control_dir}/control.sock"

[[clients]]
name = "test-agency"
{client_extra}
networks = ["127.0.0.0/8"]
sender_domains = ["bromley.gcsx.gov.uk", "example.org"]

[delivery]
ca_file = "tls/ca.pem"
retry_schedule = [1, 2]
{delivery_extra}
{routes}
"""
    (root / "gateway.toml").write_text(config_text)
    # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
    init_keys(root / "keys")
    client_context = ssl.create_default_context(cafile=str(root / "tls" / "ca.pem"))
    setup = GatewaySetup(root, root / "gateway.toml", root / "tls" / "ca.pem", client_context)
    setup.write_policy(on_insecure)
    return setup


@contextlib.asynccontextmanager
async def running_gateway(setup: GatewaySetup) -> AsyncIterator[tuple[Daemon, int]]:
    """Run the daemon in this event loop; yield it and its SMTP port."""
    daemon = Daemon(setup.config)
    task = asyncio.get_running_loop().create_task(daemon.run())
    ready = asyncio.get_running_loop().create_task(daemon.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()  # raises the start-up error
    port = daemon.servers[0].sockets[0].getsockname()[1]
    try:
        yield daemon, port
    finally:
        daemon.stopping.set()
        await asyncio.wait_for(task, 20)


@dataclass
class Transcript:
    """Replies a client saw: (code, text) per step."""

    steps: list[tuple[str, int, str]] = field(default_factory=list)

    def code(self, step: str) -> int:
        """The reply code of the named step."""
        return next(c for s, c, _ in self.steps if s == step)

    def text(self, step: str) -> str:
        """The reply text of the named step."""
        return next(t for s, _, t in self.steps if s == step)


def smtp_send(
    port: int,
    context: ssl.SSLContext,
    sender: str,
    recipients: list[str],
    message: bytes,
    *,
    starttls: bool = True,
) -> Transcript:
    """Send one message with smtplib, recording each reply (blocking: run in a thread)."""
    seen = Transcript()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="agency.test", timeout=20) as client:
        seen.steps.append(("ehlo", *_decode(client.ehlo())))
        if starttls:
            seen.steps.append(("starttls", *_decode(client.starttls(context=context))))
            seen.steps.append(("ehlo2", *_decode(client.ehlo())))
        seen.steps.append(("mail", *_decode(client.docmd("MAIL", f"FROM:<{sender}>"))))
        if seen.code("mail") != 250:
            return seen
        accepted = 0
        for number, rcpt in enumerate(recipients):
            reply = _decode(client.docmd("RCPT", f"TO:<{rcpt}>"))
            seen.steps.append((f"rcpt{number}", *reply))
            accepted += reply[0] == 250
        if not accepted:
            return seen
        seen.steps.append(("data", *_decode(client.data(message))))
    return seen


def _decode(reply: tuple[int, bytes]) -> tuple[int, str]:
    return reply[0], reply[1].decode("utf-8", "replace")


class GatewayProcess:
    """The daemon as a real subprocess, for crash and restart tests."""

    def __init__(
        self,
        setup: GatewaySetup,
        *,
        file_size_limit: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.setup = setup
        self.extra_env = env or {}
        self.file_size_limit = file_size_limit
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.output: list[str] = []
        self._reader = threading.Thread()

    def start(self, timeout: float = 20) -> int:
        """Start `gateway serve`; wait for its daemon_started line; return the port."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        # With a file size limit, writes past it fail with EFBIG (CPython ignores SIGXFSZ):
        # a real storage failure, without mocks and without root.
        limit = self.file_size_limit
        prelude = (
            f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            if limit
            else ""
        )
        code = f"{prelude}import sys; from gateway.cli import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--config", str(self.setup.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        started = threading.Event()
        self._reader = threading.Thread(target=self._drain, args=(started,), daemon=True)
        self._reader.start()
        if not started.wait(timeout) or not self.port:
            self.kill()
            msg = "gateway did not start:\n" + "".join(self.output)
            raise RuntimeError(msg)
        return self.port

    def _drain(self, started: threading.Event) -> None:
        """Read the daemon's output for its whole life, so its pipe never fills."""
        if self.proc is None or self.proc.stdout is None:
            return
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            self.output.append(line)
            if not started.is_set():
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    event = json.loads(line)
                    if event.get("event") == "daemon_started":
                        self.port = int(event["listen"][0].rsplit(":", 1)[1])
                        started.set()
        started.set()

    def events(self) -> list[dict[str, object]]:
        """The JSON log events printed so far."""
        found = []
        for line in list(self.output):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.finish()

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM, wait, return the exit status."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        return self.finish(timeout)

    def finish(self, timeout: float = 20) -> int:
        """Collect the rest of the output and the exit status."""
        if self.proc is None:
            return 0
        status = self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return status


def without_dkim(content: bytes) -> bytes:
    """A delivered message with the gateway's DKIM-Signature field (on top) taken off."""
    if not content.startswith(b"DKIM-Signature:"):
        return content
    lines = content.split(b"\r\n")
    rest = 1
    while lines[rest][:1] in (b" ", b"\t"):
        rest += 1
    return b"\r\n".join(lines[rest:])


async def eventually(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Wait until `predicate()` is true, failing after `timeout` seconds (polls every 20 ms)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)
