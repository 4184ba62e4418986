"""Turn a tenant's inbound endpoint into an ordered list of addresses to try (dnspython).

``mx:<domain>`` follows RFC 5321 §5.1: MX records in preference order (equal preferences shuffled),
each host's A/AAAA looked up with the same resolver; no MX but the domain exists → the domain
itself (implicit MX); a null MX (RFC 7505) → permanent failure. Resolver failures (SERVFAIL,
timeout) are transient: the client gets a 4xx and retries. Answers are cached for their TTL.
"""

from __future__ import annotations

import ipaddress
import random
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from relay import replies
from relay.config import Endpoint, parse_dns_server
from relay.errors import PermanentError, TransientError

_MIN_TTL = 5.0
_MAX_TTL = 3600.0


@dataclass(frozen=True)
class Target:
    address: str  # IP address or host name to connect to
    port: int
    mx_host: str  # for the log: which MX this address belongs to
    preference: int


class Resolver:
    """Async resolver with a small TTL cache. ``servers`` like ``["127.0.0.1:5353"]``;
    empty uses the system configuration."""

    def __init__(self, servers: tuple[str, ...] = (), timeout: float = 10.0) -> None:
        self.servers = servers
        self._r = dns.asyncresolver.Resolver(configure=not servers)
        if servers:
            parsed = [parse_dns_server(s) for s in servers]
            self._r.nameservers = [h for h, _ in parsed]
            self._r.port = parsed[0][1]  # dnspython has one port for all nameservers
        self._r.lifetime = timeout
        self._r.timeout = timeout
        self._cache: dict[tuple[str, str], tuple[float, list[tuple[int, str]]]] = {}

    async def _query(self, name: str, rdtype: str) -> list[tuple[int, str]]:
        """[(preference, target)] for MX, [(0, address)] for A/AAAA; cached for the answer's TTL.

        Raises dns.resolver.NXDOMAIN / NoAnswer as such; everything else becomes TransientError.
        """
        key = (name, rdtype)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit and hit[0] > now:
            return hit[1]
        try:
            ans = await self._r.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            raise
        except (dns.exception.DNSException, OSError) as e:
            raise TransientError(replies.ENDPOINT_DNS_FAILED, f"{rdtype} lookup of {name} failed: {e!r}") from e
        if rdtype == "MX":
            out = [(int(r.preference), r.exchange.to_text(omit_final_dot=True).lower()) for r in ans]
        else:
            out = [(0, r.to_text()) for r in ans]
        ttl = min(max(float(ans.rrset.ttl if ans.rrset is not None else 0), _MIN_TTL), _MAX_TTL)
        self._cache[key] = (now + ttl, out)
        return out

    async def addresses(self, host: str) -> list[str]:
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        out: list[str] = []
        for rdtype in ("AAAA", "A"):
            try:
                found = [a for _, a in await self._query(host, rdtype)]
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            # IPv6 first, each family in random order (Postfix's smtp_randomize_addresses): the
            # answer is cached for its TTL, so the DNS server's own rotation does not reach us,
            # and a tenant's endpoint is one host with several addresses (*.mail.protection.
            # outlook.com); in DNS order every new connection would go to the first of them.
            random.shuffle(found)
            out += found
        return out

    async def targets(self, ep: Endpoint) -> list[Target]:
        """Addresses to try, best first. Empty only if nothing resolved (caller: 4xx)."""
        if ep.kind == "host":
            # A fixed host (dev sink, smart-host setups): resolved by the OS at connect time.
            return [Target(ep.host, ep.port, ep.host, 0)]
        try:
            mx = await self._query(ep.host, "MX")
        except dns.resolver.NXDOMAIN as e:
            # Our own tenant's domain: an NXDOMAIN is far more likely a DNS glitch or a config
            # change in flight than a reason to bounce, so we stay transient (never lose mail).
            raise TransientError(replies.ENDPOINT_DNS_FAILED, f"{ep.host}: NXDOMAIN") from e
        except dns.resolver.NoAnswer:
            mx = [(0, ep.host)]  # RFC 5321 §5.1 implicit MX
        if len(mx) == 1 and mx[0][1] in ("", "."):
            raise PermanentError(replies.NO_ENDPOINT, f"{ep.host} publishes a null MX (RFC 7505)")
        groups: dict[int, list[str]] = {}
        for pref, host in mx:
            groups.setdefault(pref, []).append(host)
        out: list[Target] = []
        for pref in sorted(groups):
            hosts = groups[pref]
            random.shuffle(hosts)  # RFC 5321 §5.1: spread load across equal preferences
            for h in hosts:
                try:
                    addrs = await self.addresses(h)
                except TransientError:
                    continue  # fall through to the next MX
                out += [Target(a, ep.port, h, pref) for a in addrs]
        if not out:
            raise TransientError(replies.ENDPOINT_DNS_FAILED, f"no address for any MX of {ep.host}")
        return out
