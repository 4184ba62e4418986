"""Issue #13 defect 4: Exchange Online reads values back in its own formats; a tenant that matches
the plan must never show drift. One read-back per managed parameter, in the documented shapes:
address spaces (Get-InboundConnector SenderDomains "smtp:*;1"), ByteQuantifiedSize (Get-TransportRule
ExceptIfMessageSizeOver "22.5 MB (23,592,960 bytes)"), one-element collections read back as a
string (SmartHosts, FromMemberOf) and names in another case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay.provisioning import plan as planmod
from relay.provisioning.wizard import compare
from tests.support import make_deployment

READBACK: dict[str, Any] = {
    "SenderDomains": "smtp:*;1",
    "TlsSenderCertificateName": "CONTOSO-7Q4K2M.SMTP.SIGNATURE-RELAY.TEST",
    "SmartHosts": "contoso-7q4k2m.smtp.signature-relay.test",
    "TlsDomain": "*.signature-relay.test",
    "TlsSettings": "domainvalidation",
    "FromMemberOf": "sales",
    "SentToScope": "NotInOrganization",
    "ExceptIfMessageSizeOver": "22.5 MB (23,592,960 bytes)",
    "ExceptIfHeaderMatchesPatterns": "true",
    "ExceptIfFromAddressMatchesPatterns": "<>",
    "RouteMessageOutboundConnector": "signature relay outbound connector",
    "Priority": "0",
    "RequireTls": True,
}


def test_every_managed_parameter_read_back_in_exchange_format_matches(tmp_path: Path, pki_dir: Path) -> None:
    dep = make_deployment(tmp_path, pki_from=pki_dir)
    (tmp_path / "rules" / "contoso" / "groups.toml").write_text('[[group]]\nname = "Sales"\nmembers = []\n')
    cfg = dep.load()
    p = planmod.build(cfg, cfg.tenants[0], scope="group:Sales", exclude_internal=True, size_cap=23_592_960)
    covered = set()
    for obj in p.objects:
        have = {k: READBACK.get(k, v) for k, v in obj.params.items()}
        covered |= {k for k in obj.params if k in READBACK}
        have["State"] = "Enabled"
        c = compare(obj, have)
        assert c.action == "ok", (obj.name, c.diffs)
    assert covered == set(READBACK)
    # and a real difference is still one
    rule = p.rules[-1]
    bigger = {**rule.params, "ExceptIfMessageSizeOver": "30 MB (31,457,280 bytes)", "State": "Enabled"}
    assert [k for k, _, _ in compare(rule, bigger).diffs] == ["ExceptIfMessageSizeOver"]
