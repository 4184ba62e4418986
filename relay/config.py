"""Load and validate the service and tenant configuration once, into frozen objects.

Every error names the file, the key and the reason (``rules/contoso/tenant.toml: inbound.endpoint:
expected 'host:port' or 'mx:<domain>[:port]', got 'localhost'``) and stops start-up: invalid config
is never half-applied. Files are TOML (stdlib ``tomllib``) so a reviewer can diff them in git.

Relative paths in a config file are resolved against that file's directory; the embedded default
(``relay/defaults/relay.toml``, the dev profile) resolves them against the working directory, so a
checkout is a working deployment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from relay import addresses, eventloop
from relay.errors import ConfigError
from relay.mime.scanner import Limits

if TYPE_CHECKING:  # data only: loading policies (Jinja2, rules) is a separate step, relay.policy.attach
    from relay.policy import Policy

DEFAULT_CONFIG_NAME: Final = "relay/defaults/relay.toml (embedded dev profile)"
# Exchange Online advertises SIZE 157286400 (150 MiB); a smaller limit here would bounce mail
# Exchange Online itself accepted.
EXO_MAX_SIZE: Final = 157_286_400
_DOMAIN_RE: Final = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")
_HEADER_NAME_RE: Final = re.compile(r"^[!-9;-~]+$")  # RFC 5322 §3.6.8 ftext
_SUBDOMAIN_RE: Final = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_REQUIRED: Final = object()


DELIVERY_MODES: Final = ("inline", "queue", "inline-then-queue")


@dataclass(frozen=True)
class Endpoint:
    """Where a tenant's inbound connector listens: a fixed host or the MX of a domain."""

    kind: str  # "host" or "mx"
    host: str  # host name/IP, or the domain whose MX to resolve
    port: int

    @classmethod
    def parse(cls, spec: str) -> Endpoint:
        """``"127.0.0.1:2526"``, ``"[::1]:25"``, ``"mx:contoso.onmicrosoft.com"`` (port 25)."""
        if spec.startswith("mx:"):
            rest = spec[3:]
            domain, _, port_s = rest.partition(":")
            port = _parse_port(port_s) if port_s else 25
            domain = domain.lower().rstrip(".")
            if not _DOMAIN_RE.match(domain):
                raise ValueError(f"not a domain name: {domain!r}")
            return cls("mx", domain, port)
        host, port = _parse_hostport(spec)
        return cls("host", host, port)

    def __str__(self) -> str:
        if self.kind == "mx":
            return f"mx:{self.host}:{self.port}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    implicit_tls: bool = False


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    chain: Path | None
    # TLS 1.2 is the floor: Exchange Online speaks 1.2/1.3 only, and 1.0/1.1 are deprecated
    # (RFC 8996).
    min_version: str = "TLSv1.2"


@dataclass(frozen=True)
class DeliveryConfig:
    ca_bundle: Path | None  # None = the operating system's trust store
    connect_timeout: float
    command_timeout: float
    # RFC 5321 §4.5.3.2.6: wait at least 10 minutes for the reply to the final ".".
    data_timeout: float
    pool_size: int
    pool_idle: float
    dns_servers: tuple[str, ...]  # empty = system resolver (/etc/resolv.conf)
    dns_timeout: float
    # "inline" (250 only after the tenant's 250, nothing at rest), "queue" (250 once fsync'd in the
    # spool; delivered with retries; DSN when it expires) or "inline-then-queue" (inline; spooled
    # only when the endpoint is unreachable or defers). A tenant may override it.
    mode: str = "inline"
    spool_dir: Path = Path("var/spool")
    retry_min: float = 300.0  # first retry after this, doubling up to retry_max (Postfix: 300..4000 s)
    retry_max: float = 4000.0
    lifetime: float = 432_000.0  # give up (bounce) after 5 days (RFC 5321 §4.5.4.1: at least 4-5 days)
    # Refuse new queued mail with 452 4.3.1 below this much free space on the spool's filesystem,
    # before the disk is actually full (Postfix's queue_minfree).
    min_free_space: int = 64 * 1024 * 1024
    # How often the runner re-reads the spool: picks up strays and `queue retry/hold/delete`.
    rescan_interval: float = 15.0
    # Benchmark profile only: deliver without STARTTLS when the endpoint is a loopback address, so
    # the relay can be compared like with like with a plaintext Postfix (issue #14). Any other
    # endpoint still requires STARTTLS (RFC 3207 §4).
    plaintext_loopback_benchmark: bool = False
    # Cut-through (relay/cutthrough.py): a message still arriving after this many octets starts
    # going to the endpoint while it arrives; the final dot only once it proved to be what store
    # and forward would send. 0: never.
    cut_through_after: int = 256 * 1024


@dataclass(frozen=True)
class SinkConfig:
    """The dev tenant-inbound emulator (what Exchange Online's inbound connector does)."""

    enabled: bool
    host: str
    port: int
    cert: Path
    key: Path
    client_ca: Path
    maildir: Path


@dataclass(frozen=True)
class CertsConfig:
    dir: Path
    ca_cert: Path
    ca_key: Path
    server_names: tuple[str, ...]
    sink_names: tuple[str, ...]
    days: int


# Exchange Online's published outbound ranges (reference/exchange-online.md): the production
# default for who may connect at all. They prove "Exchange Online", never "tenant X".
EXO_NETWORKS: Final = ("40.92.0.0/15", "40.107.0.0/16", "52.100.0.0/14", "104.47.0.0/17",
                       "2a01:111:f400::/48", "2a01:111:f403::/48")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SecurityConfig:
    """Who may talk to us and how much (issue #5). Every limit has a sane default."""

    allowed_networks: tuple[Network, ...]
    require_client_cert: bool  # mutual TLS with Exchange Online's certificate
    client_ca: Path | None  # trust anchors for the client certificate
    client_cert_names: tuple[str, ...]
    max_recipients: int  # RFC 5321 §4.5.3.1.8: at least 100; 452 beyond
    max_connections: int
    max_connections_per_ip: int
    max_received: int  # Received: fields before we call it a loop (554 5.4.6)
    max_line_length: int  # DATA lines; longer is a 500 after the final "."
    min_data_rate: float  # bytes/s averaged over DATA, after the idle-timeout grace
    max_errors: int  # error replies in one session before 421 and close
    greeting_delay: float  # seconds; a client talking before the banner is refused (pregreet)
    tls_handshake_timeout: float = 10.0  # seconds an admitted implicit-TLS peer has to finish TLS
    max_header_bytes: int = 262_144  # top-level header section; Exchange Online's own limit is 256 KB
    max_header_fields: int = 2000  # top-level header fields (552 5.3.4 beyond)


GRAPH_CLOUDS: Final = ("global", "gcc-high", "dod", "china")  # relay.provisioning.api.CLOUDS
# The sizes Microsoft Graph keeps a user's photo in (profilephoto-get: "Supported sizes").
PHOTO_SIZES: Final = ("48x48", "64x64", "96x96", "120x120", "240x240", "360x360", "432x432", "504x504", "648x648")


@dataclass(frozen=True)
class GraphDirectory:
    """``[directory] source = "graph"``: the tenant's users, groups and photos come from Microsoft
    Graph (``signature-relay directory sync``), into ``root`` (``<var_dir>/directory/<tenant>``):
    ``state.json`` (what Graph said, and the delta links) and the snapshot ``current/``
    (``directory.csv``, ``groups.toml``, ``photos/``: the file source's own model)."""

    root: Path
    app_id: str
    certificate: Path  # PEM: the app registration's private key and certificate
    cloud: str = "global"
    sync_interval: float = 0.0  # serve syncs this often (seconds); 0 = only `directory sync`
    max_drop: float = 0.2  # refuse a snapshot with this fraction fewer users than the last one
    photos: bool = True
    photo_size: str = "96x96"
    graph_url: str = ""  # overrides the cloud's (a test emulator)
    login_url: str = ""
    ca_bundle: Path | None = None

    @property
    def current(self) -> Path:
        return self.root / "current"


@dataclass(frozen=True)
class Tenant:
    name: str
    id: str  # Entra ID tenant GUID, lower case
    initial_domain: str
    accepted_domains: frozenset[str]
    region: str  # "global" or "de"
    subdomain: str
    certificate_name: str  # the inbound connector's TlsSenderCertificateName
    endpoint: Endpoint
    tls_server_name: str
    client_cert: Path
    client_key: Path
    bind_by_sender_domain: bool
    source: Path
    networks: tuple[Network, ...] = ()  # narrower than security.allowed_networks, if set
    require_from_domain: bool = True  # From: domain must be one of accepted_domains
    require_client_cert: bool = False
    signature_dir: Path | None = None  # signatures/<name>/
    images_base_url: str = ""
    policy: Policy | None = None  # directory + rules + templates, loaded by relay.policy.attach
    delivery_mode: str = ""  # "" = the service's delivery.mode
    graph: GraphDirectory | None = None  # None: the directory is rules/<name>/directory.csv + groups.toml

    @property
    def directory_dir(self) -> Path:
        """Where the directory files are read: the Graph snapshot, or beside tenant.toml."""
        return self.graph.current if self.graph else self.source.parent


@dataclass(frozen=True)
class Config:
    source: str
    hostname: str
    service_domain: str
    processed_header: str
    listeners: tuple[Listener, ...]
    require_starttls: bool
    max_message_size: int
    idle_timeout: float
    stop_grace: float  # SIGTERM: seconds for messages in flight to finish (new sessions get 421)
    tls: TlsConfig
    delivery: DeliveryConfig
    sink: SinkConfig
    certs: CertsConfig
    tenants_dir: Path
    signatures_dir: Path
    var_dir: Path
    tenants: tuple[Tenant, ...]
    security: SecurityConfig = field(default_factory=lambda: _default_security())
    mime_limits: Limits = field(default_factory=Limits)
    metrics_listen: tuple[str, int] | None = None  # [metrics] listen; None = off
    event_loop: str = "auto"  # [service] event_loop: relay.eventloop.CHOICES
    # Not a file setting: a worker of `serve --workers N` serves the listening sockets its supervisor
    # bound: inherited descriptors by listener (host, port), one per address the host resolves to
    # (relay.smtp.server.bind_sockets).
    listen_sockets: tuple[tuple[tuple[str, int], tuple[int, ...]], ...] = ()
    _by_id: Mapping[str, Tenant] = field(default_factory=dict, repr=False, compare=False)
    _by_domain: Mapping[str, Tenant] = field(default_factory=dict, repr=False, compare=False)

    @property
    def implicit_tls(self) -> bool:
        """Whether any listener is implicit TLS (it decides the event loop: relay.eventloop)."""
        return any(lst.implicit_tls for lst in self.listeners)

    def tenant_by_id(self, tenant_id: str) -> Tenant | None:
        return self._by_id.get(tenant_id.strip().lower())

    def tenant_by_domain(self, domain: str) -> Tenant | None:
        """``domain`` must already be normalised (:func:`relay.addresses.normalise_domain`)."""
        return self._by_domain.get(domain.strip().lower().rstrip("."))

    def tenant_by_name(self, name: str) -> Tenant | None:
        return next((t for t in self.tenants if t.name == name), None)

    def with_tenants(self, tenants: Sequence[Tenant]) -> Config:
        """A copy with ``tenants`` (e.g. with their policies attached) and lookups rebuilt."""
        by_id, by_domain = _index_tenants(tenants)
        return dataclasses.replace(self, tenants=tuple(tenants), _by_id=MappingProxyType(by_id),
                                   _by_domain=MappingProxyType(by_domain))


# --- loading ---------------------------------------------------------------------------------


def load(path: str | Path | None = None) -> Config:
    """Load the config file at ``path`` (or the embedded dev profile) and every tenant."""
    if path is None:
        text = resources.files("relay").joinpath("defaults/relay.toml").read_text("utf-8")
        return _load_text(text, DEFAULT_CONFIG_NAME, Path.cwd())
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except OSError as e:
        raise ConfigError(str(p), "", f"cannot read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), "", f"not UTF-8 text: {e}") from e
    return _load_text(text, str(p), p.resolve().parent)


@dataclass(frozen=True)
class _Service:
    hostname: str
    service_domain: str
    processed_header: str
    tenants_dir: Path
    signatures_dir: Path
    var_dir: Path
    event_loop: str


def _service(root: _Section) -> _Service:
    svc = root.section("service")
    hostname = svc.domain("hostname")
    service_domain = svc.domain("service_domain")
    processed_header = svc.string("processed_header", "X-CodeTwoProcessed")
    if not _HEADER_NAME_RE.match(processed_header):
        raise ConfigError(root.file, svc.key("processed_header"), "not a valid header field name")
    tenants_dir = svc.path("tenants_dir", "rules")
    signatures_dir = svc.path("signatures_dir", "signatures")
    var_dir = svc.path("var_dir", "var")
    event_loop = svc.choice("event_loop", eventloop.CHOICES, "auto")
    if event_loop == "uvloop" and not eventloop.available():
        raise ConfigError(root.file, svc.key("event_loop"),
                          "uvloop is not installed (pip install uvloop), or say \"auto\" or \"asyncio\"")
    svc.done()
    return _Service(hostname, service_domain, processed_header, tenants_dir, signatures_dir, var_dir, event_loop)


def _listen(root: _Section) -> tuple[list[Listener], bool, int, float, float]:
    lst = root.section("listen")
    listeners = [Listener(*_hp(lst, "smtp", s)) for s in lst.str_list("smtp", ["0.0.0.0:25"])]
    listeners += [Listener(*_hp(lst, "implicit_tls", s), True) for s in lst.str_list("implicit_tls", [])]
    if not listeners:
        raise ConfigError(root.file, lst.key("smtp"), "at least one listener is required")
    require_starttls = lst.boolean("require_starttls", True)
    max_size = lst.integer("max_message_size", EXO_MAX_SIZE, 1024, 2**31)
    idle_timeout = lst.number("idle_timeout", 300.0, 1.0, 3600.0)
    stop_grace = lst.number("stop_grace", 30.0, 0.0, 3600.0)
    lst.done()
    return listeners, require_starttls, max_size, idle_timeout, stop_grace


def _tls(root: _Section) -> TlsConfig:
    tls_s = root.section("tls")
    tls = TlsConfig(
        cert=tls_s.path("cert", _REQUIRED),
        key=tls_s.path("key", _REQUIRED),
        chain=tls_s.opt_path("chain"),
        min_version=tls_s.choice("min_version", ("TLSv1.2", "TLSv1.3"), "TLSv1.2"),
    )
    tls_s.done()
    return tls


def _delivery(root: _Section, var_dir: Path) -> DeliveryConfig:
    d = root.section("delivery")
    ca = d.string("ca_bundle", "system")
    delivery = DeliveryConfig(
        ca_bundle=None if ca == "system" else d.resolve(ca),
        connect_timeout=d.number("connect_timeout", 30.0, 0.1, 600.0),
        command_timeout=d.number("command_timeout", 300.0, 0.1, 3600.0),
        data_timeout=d.number("data_timeout", 600.0, 0.1, 3600.0),
        pool_size=d.integer("pool_size", 4, 0, 1000),
        pool_idle=d.number("pool_idle", 60.0, 0.0, 3600.0),
        dns_servers=tuple(d.str_list("dns_servers", [])),
        dns_timeout=d.number("dns_timeout", 10.0, 0.1, 120.0),
        mode=d.choice("mode", DELIVERY_MODES, "inline"),
        spool_dir=d.path("spool_dir", str(var_dir / "spool")),
        retry_min=d.number("retry_min", 300.0, 0.01, 86_400.0),
        retry_max=d.number("retry_max", 4000.0, 0.01, 86_400.0),
        lifetime=d.number("lifetime", 432_000.0, 1.0, 30 * 86_400.0),
        min_free_space=d.integer("min_free_space", 64 * 1024 * 1024, 0, 2**50),
        rescan_interval=d.number("rescan_interval", 15.0, 0.1, 3600.0),
        plaintext_loopback_benchmark=d.boolean("plaintext_loopback_benchmark", False),
        cut_through_after=d.integer("cut_through_after", 256 * 1024, 0, 2**40),
    )
    for i, s in enumerate(delivery.dns_servers):
        try:
            parse_dns_server(s)
        except ValueError as e:
            raise ConfigError(root.file, f"{d.key('dns_servers')}[{i}]", f"{e}: {s!r}") from e
    d.done()
    return delivery


def _certs(root: _Section, hostname: str, service_domain: str) -> CertsConfig:
    c = root.section("certs")
    cdir = c.path("dir", "certs")
    default_names = [
        hostname, f"*.{service_domain}", f"*.smtp.{service_domain}", f"*.de-smtp.{service_domain}",
        "localhost", "127.0.0.1", "::1",
    ]
    certs = CertsConfig(
        dir=cdir,
        ca_cert=c.path("ca_cert", str(cdir / "ca.crt")),
        ca_key=c.path("ca_key", str(cdir / "ca.key")),
        server_names=tuple(c.str_list("server_names", default_names)),
        sink_names=tuple(c.str_list("sink_names", ["mail.protection.outlook.com", "localhost", "127.0.0.1"])),
        days=c.integer("days", 825, 1, 3650),
    )
    c.done()
    return certs


def _sink(root: _Section, certs: CertsConfig, var_dir: Path) -> SinkConfig:
    cdir = certs.dir
    sk = root.section("sink")
    shost, sport = _hp(sk, "listen", sk.string("listen", "127.0.0.1:2526"))
    sink = SinkConfig(
        enabled=sk.boolean("enabled", False),
        host=shost,
        port=sport,
        cert=sk.path("cert", str(cdir / "sink.crt")),
        key=sk.path("key", str(cdir / "sink.key")),
        client_ca=sk.path("client_ca", str(certs.ca_cert)),
        maildir=sk.path("maildir", str(var_dir / "sink" / "Maildir")),
    )
    sk.done()
    return sink


def _security(root: _Section) -> SecurityConfig:
    sec = root.section("security")
    security = SecurityConfig(
        allowed_networks=_networks(sec, "allowed_networks", list(EXO_NETWORKS)),
        require_client_cert=sec.boolean("require_client_cert", False),
        client_ca=sec.opt_path("client_ca"),
        client_cert_names=tuple(sec.str_list("client_cert_names", ["mail.protection.outlook.com"])),
        max_recipients=sec.integer("max_recipients", 1000, 100, 100_000),
        max_connections=sec.integer("max_connections", 1000, 1, 1_000_000),
        max_connections_per_ip=sec.integer("max_connections_per_ip", 50, 1, 1_000_000),
        max_received=sec.integer("max_received", 50, 5, 1000),
        max_line_length=sec.integer("max_line_length", 65_536, 1001, 16 * 1024 * 1024),
        min_data_rate=sec.number("min_data_rate", 500.0, 0.0, 1e9),
        max_errors=sec.integer("max_errors", 20, 1, 10_000),
        greeting_delay=sec.number("greeting_delay", 0.0, 0.0, 30.0),
        tls_handshake_timeout=sec.number("tls_handshake_timeout", 10.0, 0.5, 300.0),
        max_header_bytes=sec.integer("max_header_bytes", 262_144, 4096, 64 * 1024 * 1024),
        max_header_fields=sec.integer("max_header_fields", 2000, 50, 1_000_000),
    )
    if security.require_client_cert and security.client_ca is None:
        raise ConfigError(root.file, sec.key("client_ca"), "required when require_client_cert = true")
    sec.done()
    return security


def _metrics(root: _Section) -> tuple[str, int] | None:
    mt = root.section("metrics")
    metrics_spec = mt.string("listen", "")
    metrics_listen = _hp(mt, "listen", metrics_spec) if metrics_spec else None
    mt.done()
    return metrics_listen


def _mime(root: _Section) -> Limits:
    mm = root.section("mime")
    mime_limits = Limits(
        max_depth=mm.integer("max_depth", 100, 1, 10_000),
        max_parts=mm.integer("max_parts", 1000, 1, 1_000_000),
        max_header_bytes=mm.integer("max_header_bytes", 102_400, 1024, 64 * 1024 * 1024),
    )
    mm.done()
    return mime_limits


def _load_text(text: str, name: str, base: Path) -> Config:
    """Parse and validate one configuration file, a section at a time; errors name file and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(name, "", f"invalid TOML: {e}") from e
    root = _Section(data, name, "", base)
    svc = _service(root)
    listeners, require_starttls, max_size, idle_timeout, stop_grace = _listen(root)
    if svc.event_loop == "uvloop" and any(lst.implicit_tls for lst in listeners):
        raise ConfigError(name, "service.event_loop", "uvloop cannot serve listen.implicit_tls (it hands the "
                          "client's first TLS bytes to the relay before the TLS layer is in place); say \"auto\" "
                          "(asyncio's loop when there is an implicit-TLS listener) or \"asyncio\"")
    tls = _tls(root)
    delivery = _delivery(root, svc.var_dir)
    certs = _certs(root, svc.hostname, svc.service_domain)
    sink = _sink(root, certs, svc.var_dir)
    b = root.section("binding")
    bind_by_sender = b.boolean("sender_domain", False)
    b.done()
    security = _security(root)
    metrics_listen = _metrics(root)
    mime_limits = _mime(root)
    root.done()
    tenants = _load_tenants(svc.tenants_dir, svc.signatures_dir, svc.service_domain, certs.dir, bind_by_sender,
                            svc.var_dir)
    by_id, by_domain = _index_tenants(tenants)
    return Config(
        source=name, hostname=svc.hostname, service_domain=svc.service_domain,
        processed_header=svc.processed_header, listeners=tuple(listeners),
        require_starttls=require_starttls, max_message_size=max_size, idle_timeout=idle_timeout,
        stop_grace=stop_grace, tls=tls, delivery=delivery, sink=sink, certs=certs, tenants_dir=svc.tenants_dir,
        signatures_dir=svc.signatures_dir, var_dir=svc.var_dir, tenants=tuple(tenants), security=security,
        mime_limits=mime_limits, metrics_listen=metrics_listen, event_loop=svc.event_loop,
        _by_id=MappingProxyType(by_id), _by_domain=MappingProxyType(by_domain),
    )


def check_domain(domain: str, file: str, key: str) -> str:
    """``domain`` as the loader stores it (A-labels, lower case), or ConfigError naming file and key."""
    try:
        a = addresses.normalise_domain(domain)
    except addresses.BadDomain as e:
        raise ConfigError(file, key, str(e)) from e
    if not _DOMAIN_RE.match(a):
        raise ConfigError(file, key, f"not a domain name: {domain!r}")
    return a


def _index_tenants(tenants: Sequence[Tenant]) -> tuple[dict[str, Tenant], dict[str, Tenant]]:
    """Lookups by tenant id and by accepted domain; a duplicate id or domain is a ConfigError."""
    by_id: dict[str, Tenant] = {}
    by_domain: dict[str, Tenant] = {}
    for t in tenants:
        if t.id in by_id:
            raise ConfigError(str(t.source), "tenant.id", f"same id as {by_id[t.id].source}")
        by_id[t.id] = t
        for dom in t.accepted_domains:
            if dom in by_domain:
                raise ConfigError(
                    str(t.source), "tenant.accepted_domains",
                    f"{dom} is already an accepted domain of tenant {by_domain[dom].name!r}",
                )
            by_domain[dom] = t
    return by_id, by_domain


def certificate_name(subdomain: str, region: str, service_domain: str) -> str:
    """The per-tenant name the inbound connector checks (``TlsSenderCertificateName``)."""
    return f"{subdomain}.{'de-smtp' if region == 'de' else 'smtp'}.{service_domain}"


def _load_tenants(
    tdir: Path, sigdir: Path, service_domain: str, certs_dir: Path, bind_default: bool, var_dir: Path,
) -> list[Tenant]:
    if not tdir.is_dir():
        raise ConfigError(str(tdir), "", "tenants directory does not exist (service.tenants_dir)")
    return [_tenant(f, sigdir, service_domain, certs_dir, bind_default, var_dir)
            for f in sorted(tdir.glob("*/tenant.toml"))]


def _graph_directory(root: _Section, name: str, var_dir: Path) -> GraphDirectory | None:
    ds = root.section("directory")
    if ds.choice("source", ("file", "graph"), "file") == "file":
        ds.done()
        return None
    g = GraphDirectory(
        root=var_dir / "directory" / name, app_id=ds.string("app_id", _REQUIRED),
        certificate=ds.path("certificate", _REQUIRED), cloud=ds.choice("cloud", GRAPH_CLOUDS, "global"),
        sync_interval=ds.number("sync_interval", 0.0, 0.0, 30 * 86_400.0),
        max_drop=ds.number("max_drop", 0.2, 0.0, 1.0), photos=ds.boolean("photos", True),
        photo_size=ds.choice("photo_size", PHOTO_SIZES, "96x96"), graph_url=ds.string("graph_url", ""),
        login_url=ds.string("login_url", ""), ca_bundle=ds.opt_path("ca_bundle"),
    )
    if 0 < g.sync_interval < 300:
        raise ConfigError(root.file, ds.key("sync_interval"), "at least 300 seconds (or 0: sync by hand only)")
    ds.done()
    return g


def _tenant(f: Path, sigdir: Path, service_domain: str, certs_dir: Path, bind_default: bool,
            var_dir: Path = Path("var")) -> Tenant:
    """One ``rules/<name>/tenant.toml``: [tenant], [inbound] and [binding]."""
    try:
        data = tomllib.loads(f.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(str(f), "", f"cannot load: {e}") from e
    root = _Section(data, str(f), "", f.parent)
    t = root.section("tenant")
    name = t.string("name", f.parent.name)
    if name != f.parent.name:
        raise ConfigError(str(f), t.key("name"), f"must equal the directory name {f.parent.name!r}")
    raw_id = t.string("id", _REQUIRED)
    try:
        tid = str(uuid.UUID(raw_id))
    except ValueError as e:
        raise ConfigError(str(f), t.key("id"), f"not a tenant GUID: {raw_id!r}") from e
    initial = t.domain("initial_domain")
    if not initial.endswith(".onmicrosoft.com"):
        raise ConfigError(str(f), t.key("initial_domain"), "must be the tenant's *.onmicrosoft.com domain")
    # Unicode domains are kept as A-labels: binding compares what the wire carries.
    accepted = {check_domain(d, str(f), t.key("accepted_domains")) for d in t.str_list("accepted_domains", _REQUIRED)}
    accepted.add(initial)
    region = t.choice("region", ("global", "de"), "global")
    sub = t.string("subdomain", _REQUIRED)
    images_base_url = t.string("images_base_url", "")
    if not _SUBDOMAIN_RE.match(sub):
        raise ConfigError(str(f), t.key("subdomain"), "must be one DNS label: a-z, 0-9 and '-'")
    t.done()
    inb = root.section("inbound")
    spec = inb.string("endpoint", f"mx:{initial}")
    try:
        endpoint = Endpoint.parse(spec)
    except ValueError as e:
        raise ConfigError(
            str(f), inb.key("endpoint"), f"expected 'host:port' or 'mx:<domain>[:port]', got {spec!r} ({e})"
        ) from e
    client_cert = inb.path("client_cert", str(certs_dir / "tenants" / f"{name}.crt"))
    client_key = inb.path("client_key", str(certs_dir / "tenants" / f"{name}.key"))
    tls_name = inb.string("tls_server_name", "mail.protection.outlook.com")
    mode = inb.choice("delivery_mode", ("", *DELIVERY_MODES), "")
    inb.done()
    bs = root.section("binding")
    by_sender, tnets = bs.boolean("sender_domain", bind_default), _networks(bs, "networks", [])
    from_dom, t_mtls = bs.boolean("require_from_domain", True), bs.boolean("require_client_cert", False)
    bs.done()
    graph = _graph_directory(root, name, var_dir)
    root.done()
    return Tenant(
        name=name, id=tid, initial_domain=initial, accepted_domains=frozenset(accepted),
        region=region, subdomain=sub, certificate_name=certificate_name(sub, region, service_domain),
        endpoint=endpoint, tls_server_name=tls_name, client_cert=client_cert, client_key=client_key,
        bind_by_sender_domain=by_sender, source=f, networks=tnets, require_from_domain=from_dom,
        require_client_cert=t_mtls, signature_dir=sigdir / name, images_base_url=images_base_url,
        delivery_mode=mode, graph=graph,
    )


# --- helpers -----------------------------------------------------------------------------------


def _default_security() -> SecurityConfig:
    return SecurityConfig(
        allowed_networks=tuple(ipaddress.ip_network(n) for n in EXO_NETWORKS), require_client_cert=False,
        client_ca=None, client_cert_names=("mail.protection.outlook.com",), max_recipients=1000,
        max_connections=1000, max_connections_per_ip=50, max_received=50, max_line_length=65_536,
        min_data_rate=500.0, max_errors=20, greeting_delay=0.0)


def _networks(sec: _Section, key: str, default: list[str]) -> tuple[Network, ...]:
    out = []
    for i, n in enumerate(sec.str_list(key, default)):
        try:
            out.append(ipaddress.ip_network(n, strict=False))
        except ValueError as e:
            raise ConfigError(sec.file, f"{sec.key(key)}[{i}]", f"not a network: {n!r}") from e
    return tuple(out)


def _parse_port(s: str) -> int:
    if not s.isdigit() or not 0 < int(s) < 65536:
        raise ValueError(f"bad port {s!r}")
    return int(s)


def parse_dns_server(spec: str) -> tuple[str, int]:
    """``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"`` → (address, port)."""
    if spec.startswith("[") or spec.count(":") == 1:
        host, port = _parse_hostport(spec)
    else:
        host, port = spec, 53
    ipaddress.ip_address(host)  # nameservers are addresses, not names
    return host, port


def _parse_hostport(spec: str) -> tuple[str, int]:
    spec = spec.strip()
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected [ipv6]:port")
        ipaddress.IPv6Address(host)
        return host, _parse_port(rest[1:])
    host, sep, port = spec.rpartition(":")
    if not sep or not host:
        raise ValueError("expected host:port")
    if ":" in host:
        raise ValueError("write IPv6 addresses as [addr]:port")
    return host, _parse_port(port)


def _hp(sec: _Section, key: str, spec: str) -> tuple[str, int]:
    try:
        return _parse_hostport(spec)
    except ValueError as e:
        raise ConfigError(sec.file, sec.key(key), f"{e}: {spec!r}") from e


class _Section:
    """A table of a TOML file that remembers where it came from, for precise errors."""

    def __init__(self, data: Mapping[str, Any], file: str, prefix: str, base: Path) -> None:
        self.data = data
        self.file = file
        self.prefix = prefix
        self.base = base
        self.seen: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.prefix}.{k}" if self.prefix else k

    def _get(self, k: str, default: object) -> Any:
        self.seen.add(k)
        if k in self.data:
            return self.data[k]
        if default is _REQUIRED:
            raise ConfigError(self.file, self.key(k), "required key is missing")
        return default

    def _typed(self, k: str, default: object, typ: type | tuple[type, ...], what: str) -> Any:
        v = self._get(k, default)
        if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
            raise ConfigError(self.file, self.key(k), f"expected {what}, got {type(v).__name__} {v!r}")
        return v

    def section(self, k: str) -> _Section:
        v = self._typed(k, {}, dict, "a table")
        return _Section(v, self.file, self.key(k), self.base)

    def string(self, k: str, default: object) -> str:
        v: str = self._typed(k, default, str, "a string")
        return v

    def boolean(self, k: str, default: bool) -> bool:
        v: bool = self._typed(k, default, bool, "true or false")
        return v

    def integer(self, k: str, default: int, lo: int, hi: int) -> int:
        v: int = self._typed(k, default, int, "an integer")
        if not lo <= v <= hi:
            raise ConfigError(self.file, self.key(k), f"must be between {lo} and {hi}, got {v}")
        return v

    def number(self, k: str, default: float, lo: float, hi: float) -> float:
        v = float(self._typed(k, default, (int, float), "a number"))
        if not lo <= v <= hi:
            raise ConfigError(self.file, self.key(k), f"must be between {lo} and {hi}, got {v}")
        return v

    def choice(self, k: str, options: tuple[str, ...], default: str) -> str:
        v = self.string(k, default)
        if v not in options:
            raise ConfigError(self.file, self.key(k), f"must be one of {', '.join(options)}; got {v!r}")
        return v

    def domain(self, k: str) -> str:
        v = self.string(k, _REQUIRED).lower().rstrip(".")
        if not _DOMAIN_RE.match(v):
            raise ConfigError(self.file, self.key(k), f"not a domain name: {v!r}")
        return v

    def str_list(self, k: str, default: object) -> list[str]:
        v = self._typed(k, default, list, "a list of strings")
        if not all(isinstance(x, str) for x in v):
            raise ConfigError(self.file, self.key(k), "expected a list of strings")
        return list(v)

    def resolve(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.base / path

    def path(self, k: str, default: object) -> Path:
        return self.resolve(self.string(k, default))

    def opt_path(self, k: str) -> Path | None:
        v = self.string(k, "")
        return self.resolve(v) if v else None

    def done(self) -> None:
        """Unknown keys are errors: a typo must not silently fall back to a default."""
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.file, self.key(unknown[0]), "unknown key" + (
                f" (also: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))
