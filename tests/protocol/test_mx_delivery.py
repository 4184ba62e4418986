"""MX resolution against a real DNS server on loopback (tests/dnsserver.py), not a patched resolver."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from relay.config import Endpoint
from relay.delivery.endpoints import Resolver
from relay.errors import PermanentError, TransientError
from tests import dnsserver
from tests.protocol.conftest import Stack
from tests.protocol.test_relay_protocol import send
from tests.support import Deployment, message


@pytest.fixture
async def dns() -> AsyncIterator[tuple[dnsserver.Zone, int]]:
    zone = dnsserver.Zone()
    transport, port = await dnsserver.start(zone)
    yield zone, port
    transport.close()


async def test_mx_preference_order_and_fallthrough(dns: tuple[dnsserver.Zone, int], make_stack: object,
                                                   deployment: Deployment) -> None:
    zone, port = dns
    zone.records = {
        ("contoso.onmicrosoft.com.", "MX"): ["20 good.mx.test.", "10 dead.mx.test."],
        ("dead.mx.test.", "A"): ["127.0.0.2"],  # nothing listens there: connection refused
        ("good.mx.test.", "A"): ["127.0.0.1"],
    }
    f = deployment.root / "rules" / "contoso" / "tenant.toml"
    f.write_text(re.sub(r'endpoint = ".*"', f'endpoint = "mx:contoso.onmicrosoft.com:{deployment.sink_port}"',
                        f.read_text()))
    deployment.config_path.write_text(deployment.config_path.read_text().replace(
        "[delivery]\n", f'[delivery]\ndns_servers = ["127.0.0.1:{port}"]\ndns_timeout = 2\n'))
    st: Stack = await make_stack()  # type: ignore[operator]
    assert (await send(st, message()))[0] == 250
    assert st.delivery.outcomes[0].endpoint.endswith("(good.mx.test)")
    # the lower preference was tried first and failed over
    assert zone.queries.index(("dead.mx.test.", "A")) < zone.queries.index(("good.mx.test.", "A"))
    assert len(st.deployment.delivered()) == 1


async def test_servfail_is_transient(dns: tuple[dnsserver.Zone, int]) -> None:
    zone, port = dns
    zone.servfail = {"contoso.onmicrosoft.com."}
    r = Resolver((f"127.0.0.1:{port}",), timeout=2)
    with pytest.raises(TransientError) as e:
        await r.targets(Endpoint.parse("mx:contoso.onmicrosoft.com"))
    assert e.value.reply.code == 451 and e.value.reply.enhanced == "4.4.3"


async def test_dns_timeout_is_transient(dns: tuple[dnsserver.Zone, int]) -> None:
    zone, port = dns
    zone.drop = {"contoso.onmicrosoft.com."}
    r = Resolver((f"127.0.0.1:{port}",), timeout=0.5)
    with pytest.raises(TransientError) as e:
        await r.targets(Endpoint.parse("mx:contoso.onmicrosoft.com"))
    assert str(e.value.reply).startswith("451 4.4.3")


async def test_nxdomain_is_transient_null_mx_permanent_no_mx_implicit(dns: tuple[dnsserver.Zone, int]) -> None:
    zone, port = dns
    zone.records = {
        ("nullmx.onmicrosoft.com.", "MX"): ["0 ."],
        ("implicit.onmicrosoft.com.", "A"): ["127.0.0.1"],
    }
    r = Resolver((f"127.0.0.1:{port}",), timeout=2)
    with pytest.raises(TransientError):
        await r.targets(Endpoint.parse("mx:missing.onmicrosoft.com"))
    with pytest.raises(PermanentError):
        await r.targets(Endpoint.parse("mx:nullmx.onmicrosoft.com"))
    [t] = await r.targets(Endpoint.parse("mx:implicit.onmicrosoft.com"))
    assert (t.address, t.port, t.mx_host) == ("127.0.0.1", 25, "implicit.onmicrosoft.com")


async def test_answers_are_cached_for_their_ttl(dns: tuple[dnsserver.Zone, int]) -> None:
    zone, port = dns
    zone.records = {("c.onmicrosoft.com.", "MX"): ["10 mx.test."], ("mx.test.", "A"): ["127.0.0.1"]}
    r = Resolver((f"127.0.0.1:{port}",), timeout=2)
    for _ in range(3):
        await r.targets(Endpoint.parse("mx:c.onmicrosoft.com"))
    assert zone.queries.count(("c.onmicrosoft.com.", "MX")) == 1


async def test_equal_preferences_and_a_hosts_addresses_are_spread(dns: tuple[dnsserver.Zone, int]) -> None:
    """RFC 5321 §5.1: equal-preference MX hosts in random order (a MUST); and, as Postfix does, the
    addresses of one host too, IPv6 before IPv4: a tenant's endpoint is one host with several
    addresses, and the cached answer would otherwise send every connection to the first one."""
    zone, port = dns
    zone.records = {
        ("c.onmicrosoft.com.", "MX"): ["10 a.mx.test.", "10 b.mx.test.", "20 z.mx.test."],
        ("a.mx.test.", "A"): ["127.0.1.1", "127.0.1.2", "127.0.1.3"],
        ("a.mx.test.", "AAAA"): ["::1"],
        ("b.mx.test.", "A"): ["127.0.2.1"],
        ("z.mx.test.", "A"): ["127.0.9.9"],
    }
    r = Resolver((f"127.0.0.1:{port}",), timeout=2)
    first_host, first_a = set(), set()
    for _ in range(60):
        t = await r.targets(Endpoint.parse("mx:c.onmicrosoft.com"))
        assert [x.preference for x in t] == [10] * 5 + [20] and t[-1].address == "127.0.9.9"
        a = [x.address for x in t if x.mx_host == "a.mx.test"]
        assert a[0] == "::1" and sorted(a[1:]) == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
        first_host.add(t[0].mx_host)
        first_a.add(a[1])
    assert first_host == {"a.mx.test", "b.mx.test"}  # 2**-59 to fail by chance
    assert first_a == {"127.0.1.1", "127.0.1.2", "127.0.1.3"}  # 3 * (2/3)**60, about 1e-10
    assert zone.queries.count(("a.mx.test.", "A")) == 1  # one cached answer, shuffled each time
