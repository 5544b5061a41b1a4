"""Live reload: `gateway reload` and SIGHUP swap policy and clients without a restart."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

from gateway import replies
from gateway.audit import read_records
from tests.harness import GatewayProcess, eventually, make_setup, smtp_send
from tests.test_smtp_in import SENDER, RawClient

NHS_ONLY_REMOVED = """
[defaults]
on_insecure = "hold"

[[secure_domains]]
domain = "pnn.police.uk"
subdomains = true
"""


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the gateway command."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def events(setup, name):
    """The audit records of one event."""
    return [r for r in read_records(setup.config.audit_path) if r["event"] == name]


async def test_reload_command_swaps_the_policy_and_a_bad_policy_keeps_the_old(
    tmp_path, ca, receiver
):
    """`gateway reload` puts a new policy in force; an invalid one is refused and recorded."""
    port, _handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    process = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(process.start)
    try:
        setup.write_policy(text=NHS_ONLY_REMOVED)
        result = await asyncio.to_thread(gateway_cli, "reload", "--config", str(setup.config_path))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("reloaded: policy ")
        seen = await asyncio.to_thread(
            smtp_send, smtp_port, setup.client_context, SENDER, ["lead@nhs.net"], b"\r\nx\r\n"
        )
        assert "held as" in seen.text("data")

        setup.write_policy(text='[[secure_domains]]\ndomain = "nhs.net"\nsubdomain = true\n')
        bad = await asyncio.to_thread(gateway_cli, "reload", "--config", str(setup.config_path))
        assert bad.returncode == 1
        assert "secure-domains.toml:3" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
        still = await asyncio.to_thread(
            smtp_send,
            smtp_port,
            setup.client_context,
            SENDER,
            ["x@met.pnn.police.uk"],
            b"\r\nx\r\n",
        )
        assert "queued as" in still.text("data")
    finally:
        assert await asyncio.to_thread(process.terminate) == 0
    assert len(events(setup, "policy_loaded")) == 2
    assert len(events(setup, "policy_rejected")) == 1


async def test_sighup_reloads_the_client_list(tmp_path, ca, receiver):
    """After SIGHUP a client network removed from the config is refused at the greeting."""
    port, _handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    process = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(process.start)
    try:
        before = await RawClient.connect(smtp_port, local_addr=("127.0.0.2", 0))
        assert (await before.reply()).startswith("220")
        text = setup.config_path.read_text().replace('["127.0.0.0/8"]', '["127.0.0.1/32"]')
        setup.config_path.write_text(text)
        process.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: len(events(setup, "policy_loaded")) == 2)
        after = await RawClient.connect(smtp_port, local_addr=("127.0.0.2", 0))
        assert await after.reply() == replies.NOT_A_CLIENT
        # The session that was already connected keeps going.
        assert (await before.command("EHLO agency.test")).startswith("250")
        for client in (before, after):
            await client.close()
    finally:
        assert await asyncio.to_thread(process.terminate) == 0


def test_reload_without_a_running_daemon_is_one_clear_line(tmp_path, ca):
    """With no daemon, `gateway reload` says it cannot reach it; exit 1."""
    setup = make_setup(tmp_path, ca, receiver_port=2)
    result = gateway_cli("reload", "--config", str(setup.config_path))
    assert result.returncode == 1
    assert "cannot reach the daemon" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
