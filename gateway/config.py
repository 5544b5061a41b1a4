"""The daemon's config file (SPEC section 2) as frozen values.

`parse(table, base)` is pure: it checks every key and resolves relative paths against `base`,
the config file's folder. `load(path)` reads the file. Unknown keys and bad values are a
`ConfigError` naming the file, line and key.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from gateway import tomlfile
from gateway.errors import ConfigError
from gateway.passwords import parse_hash

DEFAULT_PATH = Path("/etc/gateway/gateway.toml")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ListenAddress:
    """One `host:port` to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    """The `[server]` table."""

    hostname: str
    listen: tuple[ListenAddress, ...]
    listen_tls: tuple[ListenAddress, ...]
    tls_cert: Path
    tls_key: Path
    require_tls: bool
    max_message_size: int
    max_recipients: int
    max_connections: int
    idle_timeout: int
    max_connections_per_address: int
    min_data_rate: int
    max_data_time: int
    hard_error_limit: int
    shutdown_grace: int
    client_ca_file: Path | None


@dataclass(frozen=True)
class Client:
    """One `[[clients]]` entry: an agency mail server allowed to relay."""

    name: str
    networks: tuple[IPNetwork, ...]
    sender_domains: tuple[str, ...]
    auth_username: str | None
    auth_password_hash: str | None
    tls_client_fingerprint: str | None

    def allows_sender_domain(self, domain: str) -> bool:
        """True when `domain` (A-label, lower case) may appear in MAIL FROM."""
        return "*" in self.sender_domains or domain in self.sender_domains


@dataclass(frozen=True)
class Route:
    """One `[[delivery.routes]]` entry: where mail for a domain goes."""

    domain: str
    subdomains: bool
    host: str
    port: int
    tls_name: str

    def matches(self, domain: str) -> bool:
        """True when this route carries mail for `domain` (A-label, lower case)."""
        if domain == self.domain:
            return True
        return self.subdomains and domain.endswith("." + self.domain)


@dataclass(frozen=True)
class DeliveryConfig:
    """The `[delivery]` table."""

    mode: str
    ca_file: Path | None
    min_tls_version: str
    retry_schedule: tuple[int, ...]
    max_queue_lifetime: int
    routes: tuple[Route, ...]
    connect_timeout: int
    concurrency: int

    def route_for(self, domain: str) -> Route | None:
        """The most specific route for `domain`, or None."""
        best: Route | None = None
        for route in self.routes:
            if route.matches(domain) and (best is None or len(route.domain) > len(best.domain)):
                best = route
        return best


@dataclass(frozen=True)
class AuditConfig:
    """The `[audit]` table: where the transfer log lives, how it is sealed and rotated."""

    path: Path
    checkpoint_every: int  # records between signed checkpoints
    checkpoint_interval: int  # seconds: a checkpoint at least this often (SPEC: hourly)
    rotate: str  # "daily" | "size" | "never"
    rotate_size: int  # bytes, for rotate = "size"
    retain_days: int  # whole files older than this are removed; 0 keeps everything


@dataclass(frozen=True)
class DkimConfig:
    """The `[dkim]` table: the signature that proves a released message passed the gateway."""

    enabled: bool
    domain: str  # d= of the signature
    selector: str  # s= of the signature


@dataclass(frozen=True)
class Config:
    """The whole daemon config."""

    file: Path
    server: ServerConfig
    spool_path: Path
    audit: AuditConfig
    keys_path: Path
    policy_path: Path
    hold_max_age: int
    release_when_secure: bool
    dkim: DkimConfig
    clients: tuple[Client, ...]
    delivery: DeliveryConfig
    notices_enabled: bool
    notices_from: str
    metrics_listen: str
    control_socket: Path
    log_level: str

    @property
    def audit_path(self) -> Path:
        """The transfer log's folder."""
        return self.audit.path

    def client_for(self, address: str) -> Client | None:
        """The first client whose networks contain the IP `address`, or None."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for client in self.clients:
            if any(ip.version == net.version and ip in net for net in client.networks):
                return client
        return None


def default_path() -> Path:
    """`$GATEWAY_CONFIG`, else /etc/gateway/gateway.toml."""
    env = os.environ.get("GATEWAY_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def load(path: Path) -> Config:
    """Read and check the config file at `path`."""
    return parse(tomlfile.read(path), path.resolve().parent)


def _listen(table: tomlfile.Table, key: str, default: tuple[str, ...]) -> tuple[ListenAddress, ...]:
    return tuple(table.convert(key, raw, parse_listen) for raw in table.strings(key, default))


def parse_listen(raw: str) -> ListenAddress:
    """Parse `host:port` or `[v6]:port`."""
    if raw.startswith("["):
        host, sep, port = raw[1:].partition("]:")
    else:
        host, sep, port = raw.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f'"{raw}" is not host:port or [v6]:port')
    return ListenAddress(host, int(port))


def _path(table: tomlfile.Table, key: str, base: Path, default: str | None = None) -> Path:
    raw = table.string(key) if default is None else table.string(key, default)
    if not raw:
        raise table.error(key, "must not be empty")
    return _resolve(base, raw)


def _metrics_listen(table: tomlfile.Table) -> str:
    raw = table.string("listen", "")
    if raw:
        table.convert("listen", raw, parse_listen)
    return raw


def _optional_path(table: tomlfile.Table, key: str, base: Path) -> Path | None:
    raw = table.string(key, "")
    return _resolve(base, raw) if raw else None


def _resolve(base: Path, raw: str) -> Path:
    """`raw` against `base`, with `..` folded so messages show the real place."""
    return Path(os.path.normpath(base / raw))


def _domain(table: tomlfile.Table, key: str, raw: str) -> str:
    domain = raw.strip().lower()
    if not domain or domain != raw.lower() or domain.endswith(".") or ".." in domain:
        raise table.error(key, f'"{raw}" is not a domain name')
    if not domain.isascii():
        raise table.error(key, f'"{raw}" must be written as an ASCII (xn--) domain')
    return domain


def _server(table: tomlfile.Table, base: Path) -> ServerConfig:
    server = ServerConfig(
        hostname=table.string("hostname"),
        listen=_listen(table, "listen", ("127.0.0.1:2525",)),
        listen_tls=_listen(table, "listen_tls", ()),
        tls_cert=_path(table, "tls_cert", base),
        tls_key=_path(table, "tls_key", base),
        require_tls=table.boolean("require_tls", default=True),
        max_message_size=table.integer("max_message_size", 26_214_400, minimum=1024),
        max_recipients=table.integer("max_recipients", 100, minimum=1),
        max_connections=table.integer("max_connections", 200, minimum=1),
        idle_timeout=table.integer("idle_timeout", 60, minimum=1),
        max_connections_per_address=table.integer("max_connections_per_address", 50, minimum=1),
        min_data_rate=table.integer("min_data_rate", 500, minimum=1),
        max_data_time=table.integer("max_data_time", 900, minimum=1),
        hard_error_limit=table.integer("hard_error_limit", 20, minimum=1),
        shutdown_grace=table.integer("shutdown_grace", 30, minimum=0),
        client_ca_file=_optional_path(table, "client_ca_file", base),
    )
    if not server.listen and not server.listen_tls:
        raise table.error("listen", "no listener: give listen or listen_tls")
    table.finish()
    return server


def _client(table: tomlfile.Table) -> Client:
    networks = []
    for raw in table.strings("networks"):
        try:
            networks.append(ipaddress.ip_network(raw, strict=True))
        except ValueError as exc:
            raise table.error("networks", f'"{raw}" is not a network: {exc}') from exc
    if not networks:
        raise table.error("networks", "must list at least one network")
    senders = tuple(
        s if s == "*" else _domain(table, "sender_domains", s)
        for s in table.strings("sender_domains")
    )
    if not senders:
        raise table.error("sender_domains", 'must list at least one domain (or "*")')
    client = Client(
        name=table.string("name"),
        networks=tuple(networks),
        sender_domains=senders,
        auth_username=table.string("auth_username", None),
        auth_password_hash=table.string("auth_password_hash", None),
        tls_client_fingerprint=_fingerprint(table),
    )
    if (client.auth_username is None) != (client.auth_password_hash is None):
        raise table.error("auth_username", "auth_username and auth_password_hash go together")
    if client.auth_password_hash is not None:
        table.convert("auth_password_hash", client.auth_password_hash, parse_hash)
    table.finish()
    return client


def _fingerprint(table: tomlfile.Table) -> str | None:
    """`sha256:` and 64 hex digits (colons allowed, as openssl prints them), lower-cased."""
    if not table.has("tls_client_fingerprint"):
        return None
    raw = table.string("tls_client_fingerprint")
    algorithm, _, digest = raw.partition(":")
    digest = digest.replace(":", "").lower()
    if (
        algorithm.lower() != "sha256"
        or len(digest) != 64
        or not set(digest) <= set("0123456789abcdef")
    ):
        raise table.error("tls_client_fingerprint", 'must be "sha256:" and 64 hex digits')
    return f"sha256:{digest}"


def _route(table: tomlfile.Table) -> Route:
    host = table.string("host")
    route = Route(
        domain=_domain(table, "domain", table.string("domain")),
        subdomains=table.boolean("subdomains", default=False),
        host=host,
        port=table.integer("port", 25, minimum=1),
        tls_name=table.string("tls_name", "") or host,
    )
    if route.port > 65535:
        raise table.error("port", f"{route.port} is not a port number")
    table.finish()
    return route


def _delivery(table: tomlfile.Table, base: Path) -> DeliveryConfig:
    ca_raw = table.string("ca_file", "")
    route_tables = list(table.tables("routes"))
    routes = tuple(_route(t) for t in route_tables)
    seen: set[str] = set()
    for route, route_table in zip(routes, route_tables, strict=True):
        if route.domain in seen:
            raise route_table.error("domain", f"{route.domain} has a route already")
        seen.add(route.domain)
    schedule = table.integers("retry_schedule", [60, 300, 900, 3600], minimum=1)
    if not schedule:
        raise table.error("retry_schedule", "must list at least one interval")
    delivery = DeliveryConfig(
        mode=table.string("mode", "routes", choices=("routes", "mx")),
        ca_file=_resolve(base, ca_raw) if ca_raw else None,
        min_tls_version=table.string("min_tls_version", "1.2", choices=("1.2", "1.3")),
        retry_schedule=schedule,
        max_queue_lifetime=table.integer("max_queue_lifetime", 432_000, minimum=1),
        routes=routes,
        connect_timeout=table.integer("connect_timeout", 30, minimum=1),
        concurrency=table.integer("concurrency", 20, minimum=1),
    )
    if delivery.mode == "mx":
        raise table.error("mode", '"mx" delivery is not available yet; use "routes"')
    table.finish()
    return delivery


def parse(root: tomlfile.Table, base: Path) -> Config:
    """Check a parsed config and build the Config; relative paths resolve against `base`."""
    server = _server(root.table("server", required=True), base)
    spool = root.table("spool", required=True)
    audit = root.table("audit", required=True)
    keys = root.table("keys", required=True)
    policy = root.table("policy", required=True)
    hold = root.table("hold")
    notices = root.table("notices")
    metrics = root.table("metrics")
    control = root.table("control")
    logging = root.table("logging")
    dkim = root.table("dkim")
    client_tables = list(root.tables("clients"))
    clients = tuple(_client(t) for t in client_tables)
    names: set[str] = set()
    for client, client_table in zip(clients, client_tables, strict=True):
        if client.name in names:
            raise client_table.error("name", f'client name "{client.name}" is used twice')
        names.add(client.name)
    config = Config(
        file=root.locator.file,
        server=server,
        spool_path=_path(spool, "path", base),
        audit=AuditConfig(
            path=_path(audit, "path", base),
            checkpoint_every=audit.integer("checkpoint_every", 1000, minimum=1),
            checkpoint_interval=audit.integer("checkpoint_interval", 3600, minimum=1),
            rotate=audit.string("rotate", "daily", choices=("daily", "size", "never")),
            rotate_size=audit.integer("rotate_size", 100 * 1024 * 1024, minimum=4096),
            retain_days=audit.integer("retain_days", 0, minimum=0),
        ),
        dkim=DkimConfig(
            enabled=dkim.boolean("enabled", default=True),
            domain=_domain(dkim, "domain", dkim.string("domain", server.hostname)),
            selector=dkim.string("selector", "gateway"),
        ),
        keys_path=_path(keys, "path", base),
        policy_path=_path(policy, "path", base),
        hold_max_age=hold.integer("max_age", 604_800, minimum=1),
        release_when_secure=hold.boolean("release_when_secure", default=False),
        clients=clients,
        delivery=_delivery(root.table("delivery"), base),
        notices_enabled=notices.boolean("enabled", default=True),
        notices_from=notices.string("from", f"postmaster@{server.hostname}"),
        metrics_listen=_metrics_listen(metrics),
        control_socket=_path(control, "socket", base, "/run/gateway/control.sock"),
        log_level=logging.string("level", "info", choices=("debug", "info", "warning", "error")),
    )
    for table in (spool, audit, keys, policy, hold, notices, metrics, control, logging, dkim):
        table.finish()
    root.finish()
    return config


def load_or_explain(path: Path) -> Config:
    """Like `load`, but a missing file is named plainly."""
    if not path.exists():
        raise ConfigError("config file not found (give --config or set GATEWAY_CONFIG)", file=path)
    return load(path)
