from pathlib import Path

import pytest

from gateway import config
from gateway.config import Client, DeliveryConfig, Route
from gateway.errors import ConfigError

MINIMAL = """\
[server]
hostname = "gw.example.org"
tls_cert = "tls/cert.pem"
tls_key = "tls/key.pem"

[spool]
path = "spool"

[audit]
path = "audit"

[keys]
path = "/etc/gateway/keys"

[policy]
path = "policies"

[[clients]]
name = "bromley-council"
networks = ["192.0.2.0/24", "2001:db8::/32"]
sender_domains = ["bromley.gov.uk"]
"""

SECOND_CLIENT = """
[[clients]]
name = "{name}"
networks = ["198.51.100.0/24"]
sender_domains = ["*"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    """Write `text` as gateway.toml in a sub-folder of tmp_path and return its path."""
    folder = tmp_path / "etc"
    folder.mkdir(exist_ok=True)
    path = folder / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _line(text: str, needle: str, occurrence: int = 1) -> int:
    """The 1-based number of the line holding the `occurrence`-th `needle`."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if line.startswith(needle)]
    return hits[occurrence - 1]


def _error(tmp_path: Path, text: str) -> tuple[Path, ConfigError]:
    """Load `text` and return the path and the ConfigError it must raise."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return path, info.value


def _with_server_key(line: str) -> str:
    """MINIMAL with one more line inside [server]."""
    return MINIMAL.replace(
        'hostname = "gw.example.org"\n', f'hostname = "gw.example.org"\n{line}\n'
    )


def _with_client_key(line: str) -> str:
    """MINIMAL with one more line inside the first [[clients]] table."""
    return MINIMAL.replace(
        'sender_domains = ["bromley.gov.uk"]\n', f'sender_domains = ["bromley.gov.uk"]\n{line}\n'
    )


# --- defaults and paths ------------------------------------------------------------------------


def test_minimal_config_gives_spec_defaults(tmp_path):
    """A minimal config loads with every default SPEC section 2 names."""
    loaded = config.load(_write(tmp_path, MINIMAL))
    actual = (
        loaded.server.require_tls,
        loaded.server.max_message_size,
        loaded.server.max_recipients,
        loaded.server.max_connections,
        loaded.server.idle_timeout,
        loaded.delivery.retry_schedule,
        loaded.delivery.max_queue_lifetime,
        loaded.hold_max_age,
        loaded.audit.checkpoint_every,
        loaded.delivery.mode,
        loaded.delivery.min_tls_version,
        loaded.delivery.routes,
        loaded.delivery.ca_file,
        loaded.notices_enabled,
        loaded.notices_from,
        loaded.metrics_listen,
        loaded.control_socket,
    )
    expected = (
        True,
        26_214_400,
        100,
        200,
        60,
        (60, 300, 900, 3600),
        432_000,
        604_800,
        1000,
        "routes",
        "1.2",
        (),
        None,
        True,
        "postmaster@gw.example.org",
        "",
        Path("/run/gateway/control.sock"),
    )
    assert expected == actual


def test_default_listener_is_localhost_2525(tmp_path):
    """Without `listen`, the server listens on 127.0.0.1:2525 and no implicit-TLS port."""
    loaded = config.load(_write(tmp_path, MINIMAL))
    expected = (("127.0.0.1:2525",), ())
    assert expected == (tuple(str(a) for a in loaded.server.listen), loaded.server.listen_tls)


def test_relative_paths_resolve_against_config_folder(tmp_path):
    """Relative paths are taken from the config file's folder; absolute paths are kept."""
    path = _write(tmp_path, MINIMAL)
    loaded = config.load(path)
    base = path.resolve().parent
    expected = (
        base / "tls/cert.pem",
        base / "tls/key.pem",
        base / "spool",
        base / "audit",
        Path("/etc/gateway/keys"),
        base / "policies",
    )
    actual = (
        loaded.server.tls_cert,
        loaded.server.tls_key,
        loaded.spool_path,
        loaded.audit_path,
        loaded.keys_path,
        loaded.policy_path,
    )
    assert expected == actual


def test_relative_ca_file_resolves_against_config_folder(tmp_path):
    """`[delivery] ca_file` is resolved like every other path."""
    path = _write(tmp_path, MINIMAL + '\n[delivery]\nca_file = "tls/ca.pem"\n')
    assert path.resolve().parent / "tls/ca.pem" == config.load(path).delivery.ca_file


def test_listen_accepts_ipv6_in_brackets(tmp_path):
    """`[v6]:port` parses to the bare v6 host and the port."""
    loaded = config.load(_write(tmp_path, _with_server_key('listen = ["[::1]:2525"]')))
    first = loaded.server.listen[0]
    expected = (("::1", 2525), "[::1]:2525")
    assert expected == ((first.host, first.port), str(first))


# --- located errors ----------------------------------------------------------------------------


def test_describe_format_is_file_line_key_problem():
    """ConfigError.describe() renders `file:line: key: problem`."""
    error = ConfigError("unknown key", file="/x/gateway.toml", line=7, key="server.bogus")
    expected = "/x/gateway.toml:7: server.bogus: unknown key"
    assert expected == error.describe()


def test_describe_leaves_out_unknown_parts():
    """Without a line or key, describe() gives `file: problem`."""
    expected = "/x/g.toml: not UTF-8 text"
    assert expected == ConfigError("not UTF-8 text", file="/x/g.toml").describe()


def test_error_message_is_describe():
    """str() of a ConfigError is its describe() text."""
    error = ConfigError("p", file="f.toml", line=2, key="k")
    assert error.describe() == str(error)


def test_unknown_key_in_server_names_line_and_key(tmp_path):
    """An unknown key in [server] is refused at its own line."""
    text = _with_server_key("hostnme = 1")
    path, error = _error(tmp_path, text)
    assert (path, _line(text, "hostnme"), "server.hostnme", "unknown key") == (
        error.file,
        error.line,
        error.key,
        error.problem,
    )


def test_unknown_key_in_second_client_names_its_line(tmp_path):
    """An unknown key in the 2nd [[clients]] is located at that key's line in the 2nd client."""
    text = MINIMAL + SECOND_CLIENT.format(name="b") + 'sender_domain = "x"\n'
    path, error = _error(tmp_path, text)
    line = _line(text, "sender_domain =")
    assert f"{path}:{line}: clients.sender_domain: unknown key" == error.describe()


def test_unknown_key_at_top_level_names_line(tmp_path):
    """A stray top-level key is refused at its line."""
    text = "stray = 1\n" + MINIMAL
    _, error = _error(tmp_path, text)
    expected = (1, "stray", "unknown key")
    assert expected == (error.line, error.key, error.problem)


def test_unknown_top_level_table_names_line(tmp_path):
    """An unknown top-level table is refused naming the line of its header."""
    text = MINIMAL + "\n[bogus]\nx = 1\n"
    path, error = _error(tmp_path, text)
    assert f"{path}:{_line(text, '[bogus]')}: bogus: unknown key" == error.describe()


def test_unknown_top_level_table_names_key(tmp_path):
    """An unknown top-level table is refused naming the table."""
    _, error = _error(tmp_path, MINIMAL + "\n[bogus]\nx = 1\n")
    expected = ("bogus", "unknown key")
    assert expected == (error.key, error.problem)


def test_missing_server_hostname_names_server_table(tmp_path):
    """A missing [server] hostname is refused at the [server] header line."""
    text = MINIMAL.replace('hostname = "gw.example.org"\n', "")
    path, error = _error(tmp_path, text)
    expected = f"{path}:{_line(text, '[server]')}: server.hostname: required key is missing"
    assert expected == error.describe()


def test_missing_client_networks_names_client_table(tmp_path):
    """A missing networks key in the 2nd [[clients]] is refused at that client's header."""
    second = SECOND_CLIENT.format(name="b").replace('networks = ["198.51.100.0/24"]\n', "")
    text = MINIMAL + second
    path, error = _error(tmp_path, text)
    expected = f"{path}:{_line(text, '[[clients]]', 2)}: clients.networks: required key is missing"
    assert expected == error.describe()


def test_missing_required_table_is_refused(tmp_path):
    """A config with no [spool] table is refused naming `spool`."""
    text = MINIMAL.replace('[spool]\npath = "spool"\n', "")
    _, error = _error(tmp_path, text)
    expected = ("spool", "required key is missing")
    assert expected == (error.key, error.problem)


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ('max_recipients = "100"', "server.max_recipients", "must be an integer, not a string"),
        ("max_recipients = true", "server.max_recipients", "must be an integer, not a boolean"),
        ("listen = 2525", "server.listen", "must be a list of strings, not an integer"),
        ('require_tls = "yes"', "server.require_tls", "must be true or false, not a string"),
        ("listen = [2525]", "server.listen", "must hold only strings, not an integer"),
        ("hostname2 = 1", "server.hostname2", "unknown key"),
    ],
)
def test_wrong_types_in_server_are_located(tmp_path, line, key, problem):
    """A value of the wrong type is refused at its line, naming the key and the types."""
    text = _with_server_key(line)
    path, error = _error(tmp_path, text)
    assert f"{path}:{_line(text, line)}: {key}: {problem}" == error.describe()


def test_retry_schedule_must_hold_integers(tmp_path):
    """A boolean inside retry_schedule is refused: `true` is not a number of seconds."""
    text = MINIMAL + "\n[delivery]\nretry_schedule = [60, true]\n"
    path, error = _error(tmp_path, text)
    expected = (
        f"{path}:{_line(text, 'retry_schedule')}: delivery.retry_schedule: "
        "must hold only integers, not a boolean"
    )
    assert expected == error.describe()


@pytest.mark.parametrize("listen", ["localhost", "localhost:70000", "localhost:", ":25", "[::1]"])
def test_bad_listen_address_is_located(tmp_path, listen):
    """A listen address without a valid port is refused at the listen line."""
    text = _with_server_key(f'listen = ["{listen}"]')
    path, error = _error(tmp_path, text)
    line = _line(text, "listen =")
    expected = f'{path}:{line}: server.listen: "{listen}" is not host:port or [v6]:port'
    assert expected == error.describe()


@pytest.mark.parametrize("network", ["300.1.1.0/24", "192.0.2.1/24", "2001:db8::1/32", "nonsense"])
def test_bad_network_is_located(tmp_path, network):
    """An invalid network, or one with host bits set, is refused at the networks line."""
    text = MINIMAL.replace('"192.0.2.0/24"', f'"{network}"')
    path, error = _error(tmp_path, text)
    prefix = f'{path}:{_line(text, "networks =")}: clients.networks: "{network}" is not a network'
    assert prefix == error.describe()[: len(prefix)]


def test_empty_networks_is_refused(tmp_path):
    """A client with an empty networks list is refused."""
    text = MINIMAL.replace('networks = ["192.0.2.0/24", "2001:db8::/32"]', "networks = []")
    path, error = _error(tmp_path, text)
    expected = f"{path}:{_line(text, 'networks')}: clients.networks: must list at least one network"
    assert expected == error.describe()


def test_duplicate_client_names_are_refused(tmp_path):
    """Two clients with the same name are refused, naming the name."""
    _, error = _error(tmp_path, MINIMAL + SECOND_CLIENT.format(name="bromley-council"))
    expected = ("clients.name", 'client name "bromley-council" is used twice')
    assert expected == (error.key, error.problem)


def test_duplicate_client_names_name_a_line(tmp_path):
    """A duplicate client name is located at the 2nd client's `name` line."""
    text = MINIMAL + SECOND_CLIENT.format(name="bromley-council")
    _, error = _error(tmp_path, text)
    assert _line(text, "name =", 2) == error.line


ROUTES = """
[[delivery.routes]]
domain = "nhs.net"
host = "a.example.net"

[[delivery.routes]]
domain = "NHS.net"
host = "b.example.net"
"""


def test_duplicate_route_domains_are_refused(tmp_path):
    """Two routes for the same domain (any case) are refused, with a line."""
    text = MINIMAL + "\n[delivery]\n" + ROUTES
    path, error = _error(tmp_path, text)
    assert (path, "delivery.routes.domain", "nhs.net has a route already", True) == (
        error.file,
        error.key,
        error.problem,
        error.line is not None,
    )


def test_duplicate_route_domains_name_the_second_route(tmp_path):
    """A duplicate route is located at the 2nd route's `domain` line."""
    text = MINIMAL + ROUTES
    _, error = _error(tmp_path, text)
    assert _line(text, "domain =", 2) == error.line


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ('min_tls_version = "1.1"', "delivery.min_tls_version", '"1.1" is not one of "1.2", "1.3"'),
        ('mode = "mx"', "delivery.mode", '"mx" delivery is not available yet; use "routes"'),
        ('mode = "smtp"', "delivery.mode", '"smtp" is not one of "routes", "mx"'),
        ("retry_schedule = []", "delivery.retry_schedule", "must list at least one interval"),
        ("retry_schedule = [0]", "delivery.retry_schedule", "values must be at least 1, not 0"),
    ],
)
def test_bad_delivery_values_are_located(tmp_path, line, key, problem):
    """A bad [delivery] value is refused at its line, naming the key."""
    text = MINIMAL + f"\n[delivery]\n{line}\n"
    path, error = _error(tmp_path, text)
    assert f"{path}:{_line(text, line)}: {key}: {problem}" == error.describe()


def test_auth_username_without_hash_is_refused(tmp_path):
    """auth_username without auth_password_hash is refused at the auth_username line."""
    text = _with_client_key('auth_username = "bromley"')
    path, error = _error(tmp_path, text)
    expected = (
        f"{path}:{_line(text, 'auth_username')}: clients.auth_username: "
        "auth_username and auth_password_hash go together"
    )
    assert expected == error.describe()


def test_auth_hash_without_username_is_refused(tmp_path):
    """auth_password_hash without auth_username is refused too."""
    _, error = _error(tmp_path, _with_client_key('auth_password_hash = "scrypt$x"'))
    expected = "auth_username and auth_password_hash go together"
    assert expected == error.problem


def test_toml_syntax_error_names_line(tmp_path):
    """A TOML syntax error is refused naming the file and the offending line."""
    text = MINIMAL + "\n[broken\n"
    path, error = _error(tmp_path, text)
    assert (path, _line(text, "[broken"), True) == (
        error.file,
        error.line,
        error.problem.startswith("not valid TOML"),
    )


def test_non_utf8_file_is_refused(tmp_path):
    """A config file that is not UTF-8 is refused naming the file."""
    path = _write(tmp_path, MINIMAL)
    path.write_bytes(MINIMAL.encode() + b"\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert f"{path}: not UTF-8 text" == info.value.describe()


def test_missing_file_is_refused(tmp_path):
    """A missing config file is a ConfigError naming the file."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert (path, "cannot read: No such file or directory") == (info.value.file, info.value.problem)


def test_load_or_explain_names_missing_file(tmp_path):
    """load_or_explain says plainly that the config file was not found."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        config.load_or_explain(path)
    assert info.value.describe().startswith(f"{path}: config file not found")


# --- lookups -----------------------------------------------------------------------------------


@pytest.fixture
def loaded(tmp_path):
    """A config with two clients: bromley (v4 and v6 networks) and a catch-all second one."""
    return config.load(_write(tmp_path, MINIMAL + SECOND_CLIENT.format(name="other")))


@pytest.mark.parametrize(
    ("address", "name"),
    [
        ("192.0.2.17", "bromley-council"),
        ("2001:db8::25", "bromley-council"),
        ("::ffff:192.0.2.17", "bromley-council"),
        ("::FFFF:198.51.100.9", "other"),
        ("198.51.100.200", "other"),
        ("203.0.113.1", None),
        ("2001:db9::1", None),
        ("::ffff:127.0.0.1", None),
        ("not an address", None),
        ("", None),
        ("192.0.2.300", None),
    ],
)
def test_client_for(loaded, address, name):
    """client_for finds the client whose networks hold the address, v4-mapped v6 included."""
    client = loaded.client_for(address)
    assert name == (client.name if client else None)


def test_client_for_maps_v4_in_v6_to_v4_network(tmp_path):
    """The v4-mapped address ::ffff:127.0.0.1 matches a client listed for 127.0.0.0/8."""
    text = MINIMAL.replace('"192.0.2.0/24"', '"127.0.0.0/8"')
    client = config.load(_write(tmp_path, text)).client_for("::ffff:127.0.0.1")
    expected = "bromley-council"
    assert expected == (client.name if client else None)


def _route(domain, *, subdomains=False, host="mx.example.net"):
    """A Route for `domain`."""
    return Route(domain=domain, subdomains=subdomains, host=host, port=25, tls_name=host)


@pytest.mark.parametrize(
    ("subdomains", "domain", "expected"),
    [
        (False, "nhs.net", True),
        (False, "mail.nhs.net", False),
        (True, "nhs.net", True),
        (True, "mail.nhs.net", True),
        (True, "a.b.nhs.net", True),
        (True, "evilnhs.net", False),
        (True, "nhs.net.evil.org", False),
        (True, "net", False),
    ],
)
def test_route_matches(subdomains, domain, expected):
    """A route matches its own domain, and subdomains only when `subdomains` is true."""
    assert expected == _route("nhs.net", subdomains=subdomains).matches(domain)


def test_route_for_picks_most_specific():
    """route_for prefers the longest matching domain, whatever the order of routes."""
    general = _route("nhs.net", subdomains=True, host="general")
    specific = _route("trust.nhs.net", subdomains=True, host="specific")
    delivery = DeliveryConfig(
        mode="routes",
        ca_file=None,
        min_tls_version="1.2",
        retry_schedule=(60,),
        max_queue_lifetime=1,
        routes=(general, specific),
        connect_timeout=30,
        concurrency=1,
    )
    expected = ("specific", "specific", "general", "general", None)
    actual = tuple(
        r.host if r else None
        for r in (
            delivery.route_for("trust.nhs.net"),
            delivery.route_for("a.trust.nhs.net"),
            delivery.route_for("other.nhs.net"),
            delivery.route_for("nhs.net"),
            delivery.route_for("gmail.com"),
        )
    )
    assert expected == actual


def test_routes_from_file_default_tls_name_to_host(tmp_path):
    """A route read from the file gets port 25 and tls_name = host by default."""
    text = MINIMAL + '\n[[delivery.routes]]\ndomain = "nhs.net"\nhost = "mx.example.net"\n'
    assert (_route("nhs.net"),) == config.load(_write(tmp_path, text)).delivery.routes


def _client(senders):
    """A Client allowing `senders`."""
    return Client(
        name="c",
        networks=(),
        sender_domains=senders,
        auth_username=None,
        auth_password_hash=None,
        tls_client_fingerprint=None,
    )


@pytest.mark.parametrize(
    ("senders", "domain", "expected"),
    [
        (("*",), "anything.example", True),
        (("bromley.gov.uk", "*"), "gmail.com", True),
        (("bromley.gov.uk",), "bromley.gov.uk", True),
        (("bromley.gov.uk",), "sub.bromley.gov.uk", False),
        (("bromley.gov.uk",), "gmail.com", False),
    ],
)
def test_allows_sender_domain(senders, domain, expected):
    """A client allows its listed sender domains exactly, or any domain with "*"."""
    assert expected == _client(senders).allows_sender_domain(domain)


def test_sender_domains_are_lower_cased(tmp_path):
    """Sender domains from the file are stored in lower case."""
    text = MINIMAL.replace('"bromley.gov.uk"', '"Bromley.GOV.uk"')
    expected = ("bromley.gov.uk",)
    assert expected == config.load(_write(tmp_path, text)).clients[0].sender_domains
