"""The daemon: start in order, serve, stop in reverse.

Start: keys -> policy -> spool recovery (before listening) -> audit log -> delivery worker ->
SMTP listeners. Stop (SIGTERM/SIGINT): stop accepting, close listeners, stop the worker (an
attempt in flight is retried after restart: its spool state only changes once it is recorded),
close the audit log. SIGHUP reloads the policy; an invalid policy leaves the old one in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import functools
import os
import signal
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway import memtune, records, tls
from gateway.admin import AdminService
from gateway.audit import AuditLog
from gateway.config import Config, ListenAddress, parse_listen
from gateway.config import load as load_config
from gateway.control import ControlServer
from gateway.delivery import Deliverer
from gateway.errors import ConfigError, GatewayError, SpoolError
from gateway.holdqueue import HoldQueue
from gateway.inbound import Inbound
from gateway.keys import SPOOL_KEY_FILE, load_keys
from gateway.logconfig import get_logger
from gateway.metrics import Metrics, MetricsServer, audit_source, queue_source
from gateway.notifier import Notifier
from gateway.policy import Policy, load_policy
from gateway.queue_index import QueueIndex
from gateway.sdnotify import SystemdNotifier, keep_alive
from gateway.smtp_in import GatewaySMTP
from gateway.spool import Spool
from gateway.worker import DecisionSigner, Worker

log = get_logger("daemon")

TRIM_EVERY = 5.0  # seconds between two returns of free heap pages to the system


def utc_now() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


class PolicyHolder:
    """The policy in force; swapped whole on reload, read by every decision."""

    def __init__(self, policy: Policy) -> None:
        self.current = policy

    def __call__(self) -> Policy:
        """The policy in force now."""
        return self.current


class Daemon:
    """One running gateway."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.servers: list[asyncio.Server] = []
        self.inbound: Inbound | None = None
        self._background: set[asyncio.Task[object]] = set()
        self.control = ControlServer(config.control_socket, {"reload": self._control_reload})
        self.sd = SystemdNotifier.from_environment()
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None
        self.metrics_port = 0

    async def run(self) -> None:
        """Start everything, serve until asked to stop, then stop everything."""
        faulthandler.enable()  # a watchdog abort shows every thread's frames in the journal
        watchdog: asyncio.Task[None] | None = None
        if self.sd is not None:
            self.sd.status("starting: keys, policy, spool recovery")
            interval = self.sd.watchdog_interval()
            if interval is not None:
                # Pings come from the event loop itself: a stuck loop stops them.
                watchdog = asyncio.get_running_loop().create_task(keep_alive(self.sd, interval))
        try:
            await self._run()
        finally:
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            if self.sd is not None:
                self.sd.close()

    async def _run(self) -> None:
        config = self.config
        process_start = time.time()
        # Under systemd the keys come as credentials (LoadCredential=); else from [keys] path.
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        keys_path = (
            Path(credentials)
            if credentials and (Path(credentials) / SPOOL_KEY_FILE).exists()
            else config.keys_path
        )
        keys = await asyncio.to_thread(load_keys, keys_path)
        self.policy = PolicyHolder(await asyncio.to_thread(load_policy, config.policy_path))
        server_context = await asyncio.to_thread(
            functools.partial(
                tls.server_context,
                config.server.tls_cert,
                config.server.tls_key,
                request_client_cert=any(c.tls_client_fingerprint for c in config.clients),
                client_ca_file=config.server.client_ca_file,
            )
        )
        client_context = await asyncio.to_thread(
            tls.client_context,
            ca_file=config.delivery.ca_file,
            min_version=config.delivery.min_tls_version,
        )
        self.spool = Spool(config.spool_path, keys.spool_key)
        with contextlib.ExitStack() as held:
            # The daemon holds the spool's lock for its whole life: CLI commands that work on
            # the spool directly (no daemon running) take it too, so they never overlap.
            await self._lock_spool(held)
            for problem in await asyncio.to_thread(self.spool.prepare, process_start=process_start):
                log.warning("spool_recovered", detail=problem)
            self.audit = AuditLog.from_config(config.audit, keys.signing_key)
            await self.audit.start()
            if self.audit.repaired_seq is not None:
                log.warning("audit_log_repaired", seq=self.audit.repaired_seq)
            for name in self.audit.removed_files:
                log.info("audit_file_removed", file=name, reason="retain_days")
            if config.dkim.enabled and keys.dkim_key is None:
                log.warning("dkim_key_missing", hint="run `gateway keys init` to add it")
            self.keys = keys
            try:
                await self._serve(keys.pseudonym_key, server_context, client_context)
            finally:
                await self.audit.close()

    async def _serve(
        self, pseudonym_key: bytes, server_context: ssl.SSLContext, client_context: ssl.SSLContext
    ) -> None:
        config = self.config
        await self.audit.append(
            records.policy_loaded(
                policy=self.policy.current.version, source=str(config.policy_path)
            )
        )
        deliverer = Deliverer(
            tls_context=client_context,
            helo_name=config.server.hostname,
            connect_timeout=config.delivery.connect_timeout,
            max_idle_per_route=config.delivery.concurrency,
        )
        worker = self.worker = Worker(
            spool=self.spool,
            audit=self.audit,
            deliverer=deliverer,
            delivery=config.delivery,
            policy=self.policy,
            clock=utc_now,
            metrics=self.metrics,
            signer=(
                DecisionSigner(self.keys.dkim_key, config.dkim)
                if config.dkim.enabled and self.keys.dkim_key is not None
                else None
            ),
        )
        index = QueueIndex(self.spool)
        self.metrics.set_queue_source(queue_source(index, utc_now))
        self.metrics.set_audit_source(audit_source(self.audit, utc_now))
        notifier = Notifier(config=config, spool=self.spool, enqueue=worker.enqueue, clock=utc_now)
        worker.notifier = notifier
        self.admin = AdminService(
            spool=self.spool,
            index=index,
            holdqueue=HoldQueue(
                spool=self.spool,
                audit=self.audit,
                policy=self.policy,
                notifier=notifier,
                enqueue=worker.enqueue,
                clock=utc_now,
                max_age=config.hold_max_age,
                metrics=self.metrics,
            ),
            clock=utc_now,
            expiry_every=min(60.0, config.hold_max_age / 4),
        )
        self.control.handlers.update(self.admin.handlers())
        recovered = await worker.recover()
        worker.start()
        self._keep(asyncio.get_running_loop().create_task(asyncio.to_thread(index.load)))
        self.admin.start_expiry()
        inbound = self.inbound = Inbound(
            config=config,
            policy=self.policy,
            spool=self.spool,
            audit=self.audit,
            pseudonym_key=pseudonym_key,
            on_accepted=worker.enqueue,
            metrics=self.metrics,
        )
        inbound.notifier = notifier
        loop = asyncio.get_running_loop()
        try:
            await self._listen(inbound, server_context)
            await self._start_control()
            await self._start_metrics()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stopping.set)
            loop.add_signal_handler(
                signal.SIGHUP, lambda: self._keep(loop.create_task(self._reload_from_signal()))
            )
            log.info(
                "daemon_started",
                listen=[address for s in self.servers for address in self._bound(s)],
                policy=self.policy.current.short_version,
                recovered=recovered,
                clients=len(config.clients),
            )
            self.ready.set()
            self._keep(loop.create_task(_trim_memory()))
            if self.sd is not None:
                listening = ", ".join(a for s in self.servers for a in self._bound(s))
                self.sd.ready(
                    f"serving on {listening}; policy {self.policy.current.short_version}; "
                    f"{recovered} recovered"
                )
                self._keep(loop.create_task(self._report_status(index, inbound)))
            await self.stopping.wait()
            log.info("daemon_stopping", sessions=inbound.connections)
            if self.sd is not None:
                self.sd.stopping(f"stopping: draining {inbound.connections} sessions")
            grace = float(config.server.shutdown_grace)
            started = loop.time()
            left = await inbound.drain(grace)
            if left:
                log.warning("sessions_cut_at_shutdown", sessions=left)
            grace = max(0.0, grace - (loop.time() - started))
        finally:
            inbound.accepting = False
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            for server in self.servers:
                server.close()
            for server in self.servers:
                await server.wait_closed()
            await self.control.close()
            if self.metrics_server is not None:
                await self.metrics_server.close()
            await self.admin.stop()
            await worker.stop(grace if self.stopping.is_set() else 0.0)
        log.info("daemon_stopped")

    async def _listen(self, inbound: Inbound, server_context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        listeners: list[tuple[ListenAddress, bool]] = [
            (a, False) for a in self.config.server.listen
        ]
        listeners += [(a, True) for a in self.config.server.listen_tls]
        for address, implicit in listeners:
            try:
                server = await loop.create_server(
                    lambda implicit=implicit: GatewaySMTP(
                        inbound,
                        tls_context=server_context,
                        implicit_tls=implicit,
                    ),
                    address.host,
                    address.port,
                    ssl=server_context if implicit else None,
                    reuse_address=True,
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {address}: {exc.strerror or exc}",
                    file=self.config.file,
                    key="server.listen",
                ) from exc
            self.servers.append(server)

    async def _start_metrics(self) -> None:
        listen = self.config.metrics_listen
        if not listen:
            return
        address = parse_listen(listen)
        self.metrics_server = MetricsServer(self.metrics, address.host, address.port)
        try:
            port = self.metrics_port = await self.metrics_server.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {listen}: {exc.strerror or exc}",
                file=self.config.file,
                key="metrics.listen",
            ) from exc
        log.info("metrics_listening", listen=f"{address.host}:{port}")

    async def _lock_spool(self, stack: contextlib.ExitStack, patience: float = 10.0) -> None:
        """Take the spool's lock, waiting a little for a CLI command that holds it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while True:
            try:
                stack.enter_context(self.spool.locked(wait=False))
            except SpoolError as exc:
                if loop.time() >= deadline:
                    raise SpoolError(
                        f"{self.config.spool_path}: the spool is in use by another process "
                        "(is another gateway daemon running on it?)"
                    ) from exc
                await asyncio.sleep(0.2)
            else:
                return

    async def _start_control(self) -> None:
        try:
            await self.control.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot make the control socket {self.config.control_socket}: "
                f"{exc.strerror or exc}",
                file=self.config.file,
                key="control.socket",
            ) from exc

    async def _control_reload(self, _request: dict[str, object], actor: str) -> object:
        log.info("reload_requested", actor=actor)
        return await self.reload()

    def _keep(self, task: asyncio.Task[object]) -> None:
        """Hold a reference to a background task until it ends."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _bound(server: asyncio.Server) -> list[str]:
        found = []
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return found

    async def reload(self) -> dict[str, object]:
        """Load the client list and the policy again and swap both at once.

        If either file is invalid, the old configuration stays in force, the refusal is
        recorded (`policy_rejected`) and the error is raised for the CLI to show.
        Sessions already connected keep the client they were matched to.
        """
        if self.sd is not None:
            self.sd.reloading("reloading config and policy")
        try:
            return await self._reload()
        finally:
            # READY=1 must follow RELOADING=1 on every path, or the unit stays "reloading".
            if self.sd is not None:
                self.sd.ready(f"serving; policy {self.policy.current.short_version}")

    async def _reload(self) -> dict[str, object]:
        try:
            config = await asyncio.to_thread(load_config, self.config.file)
            policy = await asyncio.to_thread(load_policy, config.policy_path)
        except GatewayError as exc:
            log.error("policy_rejected", error=str(exc))  # noqa: TRY400  (one line, no traceback)
            await self.audit.append(records.policy_rejected(error=str(exc)))
            raise
        self.config = dataclasses.replace(self.config, clients=config.clients)
        if self.inbound is not None:
            self.inbound.config = self.config
        self.policy.current = policy
        await self.audit.append(
            records.policy_loaded(policy=policy.version, source=str(self.config.policy_path))
        )
        log.info("policy_loaded", policy=policy.short_version, clients=len(config.clients))
        held = await self.admin.held()
        releasable = self.admin.holdqueue.releasable(held)
        released: list[str] = []
        if self.config.release_when_secure and releasable:
            released = await self.admin.release_secure(policy.version)
        if releasable:
            log.info("held_messages_releasable", count=len(releasable), released=len(released))
        return {
            "policy": policy.version,
            "clients": len(config.clients),
            "releasable": [r for r in releasable if r not in released],
            "released": released,
        }

    async def _report_status(self, index: QueueIndex, inbound: Inbound) -> None:
        """A STATUS line for `systemctl status` every minute: queue sizes and sessions."""
        while self.sd is not None:
            await asyncio.sleep(60)
            if index.loaded.is_set():
                counts = index.counts()
                queue = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                self.sd.status(f"{queue or 'queue empty'}; {inbound.connections} sessions")

    async def _reload_from_signal(self) -> None:
        with contextlib.suppress(GatewayError):  # recorded and logged by reload()
            await self.reload()


async def _trim_memory() -> None:
    """Every TRIM_EVERY seconds, give the heap's free pages back (see memtune)."""
    while True:
        await asyncio.sleep(TRIM_EVERY)
        await asyncio.to_thread(memtune.trim)


def serve(config: Config) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    memtune.tune()  # before any thread starts: see memtune
    asyncio.run(Daemon(config).run())
