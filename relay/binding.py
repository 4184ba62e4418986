"""Bind a message to exactly one configured tenant, or refuse it (pure; no I/O).

The relay re-injects mail through tenants' trusted inbound connectors, so a message that cannot
be bound to a tenant must never be relayed: that is what makes us not an open relay. Exchange
Online's IPs and client certificate are shared by every tenant, so they can only ever prove
"this is Exchange Online" — never "this is tenant X" (the 2024 "EchoSpoofing" abuse).

The tenant is found by the ``X-MS-Exchange-CrossTenant-Id`` header Exchange Online adds with
CloudServicesMailEnabled (or, in the dev profile only, by the envelope sender's domain); then every
layer that tenant requires must agree: envelope and ``From:`` domains, networks, client
certificate, SNI. Which networks may connect at all is decided earlier, in ``relay.smtp.server``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from relay import addresses, replies
from relay.config import Config, Tenant
from relay.errors import PermanentError
from relay.mime import headers

CROSS_TENANT_HEADER = "X-MS-Exchange-CrossTenant-Id"


class Unbound(PermanentError):
    """No served tenant owns this message. The reply is generic; ``detail`` is for the log."""

    def __init__(self, detail: str) -> None:
        super().__init__(replies.NOT_AUTHORIZED, detail)


@dataclass(frozen=True)
class Peer:
    """What the connection proves: never the tenant by itself (shared by all of Exchange Online)."""

    ip: str | None = None
    cert_names: tuple[str, ...] = ()  # verified client certificate names (empty: none presented)
    sni: str | None = None  # server name the client asked for, if any


@dataclass(frozen=True)
class Binding:
    tenant: Tenant
    how: str  # "cross-tenant-id" or "sender-domain"


def sender_domain(mail_from: str) -> str | None:
    """Domain of an envelope sender in A-label form (UTS #46); None for the null sender ``<>``.

    Raises :class:`Unbound` for a domain that is not a valid IDN or that normalisation would
    silently turn into another one (U+212A KELVIN SIGN folding into "k": issue #10, finding 9)."""
    if not mail_from:
        return None
    _, at, dom = mail_from.rpartition("@")
    if not at:
        return ""
    try:
        return addresses.normalise_domain(dom)
    except addresses.BadDomain as e:
        raise Unbound(f"sender domain refused: {e}") from e


def check_sender(cfg: Config, mail_from: str) -> None:
    """At MAIL FROM: a non-null sender must belong to a served tenant.

    Rejecting here (not only after DATA) means a stranger never even gets a 250 to RCPT.
    """
    dom = sender_domain(mail_from)
    if dom is not None and cfg.tenant_by_domain(dom) is None:
        raise Unbound(f"sender domain {dom!r} belongs to no configured tenant")


def bind(cfg: Config, mail_from: str, raw: bytes | bytearray, peer: Peer | None = None,
         top: dict[str, list[str]] | None = None) -> Binding:
    """Bind the message (after DATA) to its tenant, or raise :class:`Unbound`: the tenant by its
    id (or dev sender-domain), then every layer that tenant requires must agree. ``top`` is the
    header index :mod:`relay.ingress` parsed once (the same one stamping reads)."""
    top = headers.index(raw) if top is None else top
    b = _tenant_of(cfg, mail_from, top)
    _check_layers(cfg, b.tenant, top, peer or Peer())
    return b


def from_domains(top: dict[str, list[str]]) -> list[str]:
    """The From: addresses' domains, normalised as tenant lookups expect (A-labels)."""
    out = []
    for a in headers.addresses(top, "from"):  # the parse policy.sender_identity reads too
        dom = a.rpartition("@")[2]
        try:
            out.append(addresses.normalise_domain(dom))
        except addresses.BadDomain:
            out.append(f"(invalid) {dom}")
    return out


def _check_layers(cfg: Config, t: Tenant, top: dict[str, list[str]], peer: Peer) -> None:
    if t.require_from_domain:
        doms = from_domains(top)
        if len(doms) != 1 or doms[0] not in t.accepted_domains:
            raise Unbound(f"From: domain(s) {doms[:3]!r} not an accepted domain of tenant {t.name!r}")
    if t.networks:
        try:
            ip = ipaddress.ip_address((peer.ip or "").split("%")[0])
        except ValueError as e:
            raise Unbound(f"peer address {peer.ip!r} unparsable") from e
        if not any(ip in n for n in t.networks):
            raise Unbound(f"peer {peer.ip} outside tenant {t.name!r} networks")
    if t.require_client_cert and not any(n.lower() in {c.lower() for c in cfg.security.client_cert_names}
                                         for n in peer.cert_names):
        raise Unbound(f"tenant {t.name!r} requires Exchange Online's client certificate; got {peer.cert_names!r}")
    if peer.sni:
        m = re.fullmatch(r"([a-z0-9-]+)\.(smtp|de-smtp)\." + re.escape(cfg.service_domain), peer.sni)
        if m and (m.group(1) != t.subdomain or (m.group(2) == "de-smtp") != (t.region == "de")):
            raise Unbound(f"SNI {peer.sni!r} names another tenant than {t.name!r}")


def _tenant_of(cfg: Config, mail_from: str, top: dict[str, list[str]]) -> Binding:
    ids = top.get(CROSS_TENANT_HEADER.lower(), [])
    dom = sender_domain(mail_from)
    if len(ids) > 1:
        # More than one is either a misrouted message or an attempt to confuse us.
        raise Unbound(f"{len(ids)} {CROSS_TENANT_HEADER} fields")
    if ids:
        tenant = cfg.tenant_by_id(ids[0])
        if tenant is None:
            raise Unbound(f"{CROSS_TENANT_HEADER} {ids[0][:64]!r} is not a configured tenant")
        if dom is not None and dom not in tenant.accepted_domains:
            raise Unbound(f"sender domain {dom!r} is not an accepted domain of tenant {tenant.name!r}")
        return Binding(tenant, "cross-tenant-id")
    if dom is None:
        raise Unbound(f"null sender without {CROSS_TENANT_HEADER}")
    tenant = cfg.tenant_by_domain(dom)
    if tenant is None:
        raise Unbound(f"sender domain {dom!r} belongs to no configured tenant")
    if not tenant.bind_by_sender_domain:
        raise Unbound(f"no {CROSS_TENANT_HEADER} and tenant {tenant.name!r} requires it")
    return Binding(tenant, "sender-domain")
