"""A real (tiny) authoritative DNS server on loopback UDP, for MX tests: dnspython parses and
builds the wire messages, the relay's resolver talks to it over a real socket."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


@dataclass
class Zone:
    # (name, rdtype) -> list of rdata texts, e.g. ("contoso.onmicrosoft.com.", "MX") -> ["10 mx1.test."]
    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    servfail: set[str] = field(default_factory=set)  # names answered with SERVFAIL
    drop: set[str] = field(default_factory=set)  # names never answered (resolver timeout)
    queries: list[tuple[str, str]] = field(default_factory=list)


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        question = q.question[0]
        name, rdtype = question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype)
        self.zone.queries.append((name, rdtype))
        if name in self.zone.drop:
            return
        r.flags |= dns.flags.AA
        if name in self.zone.servfail:
            r.set_rcode(dns.rcode.SERVFAIL)
        elif (name, rdtype) in self.zone.records:
            r.answer.append(dns.rrset.from_text_list(name, 300, "IN", rdtype, self.zone.records[(name, rdtype)]))
        elif not any(n == name for n, _ in self.zone.records):
            r.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(r.to_wire(), addr)


async def start(zone: Zone) -> tuple[asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Proto(zone), local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    return transport, port


