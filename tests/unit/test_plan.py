"""The connector plan against the reference (shared/reference/exchange-online.md and the product's
connectors-configuration.txt), for each scope option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay import cli, config, policy
from relay.provisioning import plan as planmod

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg(monkeypatch: pytest.MonkeyPatch) -> config.Config:
    monkeypatch.chdir(REPO)
    return policy.attach(config.load())


def test_connectors_match_the_reference(cfg: config.Config) -> None:
    p = planmod.build(cfg, cfg.tenants[0])
    assert p.inbound.name == "Signature Relay Inbound Connector 2.0"
    assert p.inbound.params == {
        "ConnectorType": "OnPremises", "SenderDomains": ["*"],
        "TlsSenderCertificateName": "contoso-7q4k2m.smtp.signature-relay.test", "RequireTls": True,
        "RestrictDomainsToCertificate": True, "CloudServicesMailEnabled": True, "Enabled": True}
    assert "TreatMessagesAsInternal" not in p.inbound.params  # can't be true with CloudServicesMailEnabled
    assert p.outbound.name == "Signature Relay Outbound Connector"
    assert p.outbound.params == {
        "ConnectorType": "OnPremises", "IsTransportRuleScoped": True, "UseMXRecord": False,
        "SmartHosts": ["contoso-7q4k2m.smtp.signature-relay.test"], "TlsSettings": "DomainValidation",
        "TlsDomain": "*.signature-relay.test", "CloudServicesMailEnabled": True,
        "RouteAllMessagesViaOnPremises": False, "Enabled": True}
    assert "Port" not in p.outbound.params  # no port: Exchange Online always uses 25


REQUIRED_RULE = {
    "FromScope": "InOrganization", "RouteMessageOutboundConnector": "Signature Relay Outbound Connector",
    "ExceptIfHeaderMatchesMessageHeader": "X-CodeTwoProcessed", "ExceptIfHeaderMatchesPatterns": ["true"],
    "ExceptIfMessageTypeMatches": "Calendaring", "ExceptIfFromAddressMatchesPatterns": ["<>"],
    "SenderAddressLocation": "HeaderOrEnvelope", "RuleErrorAction": "Defer", "StopRuleProcessing": True,
    "Mode": "Enforce",
}


@pytest.mark.parametrize(("kwargs", "extra", "absent"), [
    ({}, {"Priority": 0}, ["FromMemberOf", "SentToScope", "ExceptIfMessageSizeOver"]),
    ({"scope": "group:Signature Users"}, {"FromMemberOf": ["Signature Users"]}, ["SentToScope"]),
    ({"exclude_internal": True}, {"SentToScope": "NotInOrganization"}, ["FromMemberOf"]),
    ({"scope": "group:Sales", "exclude_internal": True, "size_cap": planmod.DEFAULT_SIZE_CAP},
     {"FromMemberOf": ["Sales"], "SentToScope": "NotInOrganization", "ExceptIfMessageSizeOver": 23592960}, []),
])
def test_transport_rule_for_each_scope(cfg: config.Config, kwargs: dict[str, object], extra: dict[str, object],
                                       absent: list[str]) -> None:
    p = planmod.build(cfg, cfg.tenants[0], **kwargs)  # type: ignore[arg-type]
    [rule] = p.rules
    assert rule.name == "Signature Relay Exchange transport rule"
    for k, v in {**REQUIRED_RULE, **extra}.items():
        assert rule.params[k] == v, k
    for k in absent:
        assert k not in rule.params


def test_out_of_office_and_recall_exceptions_come_first(cfg: config.Config) -> None:
    p = planmod.build(cfg, cfg.tenants[0], except_oof=True, except_recall=True)
    oof, recall, recall_subject, main = p.rules
    assert oof.params == {"MessageTypeMatches": "OOF", "SetHeaderName": "X-CodeTwoProcessed",
                          "SetHeaderValue": "true", "Priority": 0, "Mode": "Enforce"}
    assert recall.params["HeaderMatchesMessageHeader"] == "Content-Class" and recall.params["Priority"] == 1
    assert recall_subject.params["SubjectMatchesPatterns"] == ["^Recall:"] and recall_subject.params["Priority"] == 2
    assert main.params["Priority"] == 3


def test_recall_subject_patterns_are_anchored_and_escaped() -> None:
    assert planmod.recall_patterns(("Recall:", " Rappel : ", "RE(1):", "")) == [
        "^Recall:", r"^Rappel\s:", r"^RE\(1\):"]


def test_licence_counts_from_the_directory(cfg: config.Config) -> None:
    assert planmod.build(cfg, cfg.tenants[0]).senders_in_scope == 7
    assert planmod.build(cfg, cfg.tenants[0], scope="group:Sales").senders_in_scope == 3  # nested EMEA included
    assert planmod.build(cfg, cfg.tenants[0], scope="group:Signature Users").senders_in_scope == 7  # hidden group
    with pytest.raises(ValueError):
        planmod.build(cfg, cfg.tenants[0], scope="everyone")


@pytest.mark.usefixtures("cfg")  # runs in the repository (the sample tenant)
def test_powershell_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["connectors", "plan", "--scope", "group:Sales", "--exclude-internal",
                     "--format", "powershell"]) == 0
    ps = capsys.readouterr().out
    assert ("New-InboundConnector -Name 'Signature Relay Inbound Connector 2.0' -ConnectorType 'OnPremises' "
            "-SenderDomains @('*') -TlsSenderCertificateName 'contoso-7q4k2m.smtp.signature-relay.test' "
            "-RequireTls $true -RestrictDomainsToCertificate $true -CloudServicesMailEnabled $true "
            "-Enabled $true") in ps
    assert "-FromMemberOf @('Sales') -SentToScope 'NotInOrganization'" in ps
    assert "Validate-OutboundConnector -Identity 'Signature Relay Outbound Connector'" in ps
    assert "Set-OutboundConnector -Identity 'Signature Relay Outbound Connector' -IsValidated $true" in ps
    assert cli.main(["connectors", "plan", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [o["cmdlet"] for o in data["objects"]] == ["New-InboundConnector", "New-OutboundConnector",
                                                      "New-TransportRule"]
    assert data["senders_in_scope"] == 7
    assert cli.main(["connectors", "plan", "--format", "text"]) == 0
    text = capsys.readouterr().out
    assert "every one of them uses a licence" in text and "'Retain internal Exchange email headers' checked" in text
    assert "'Defer the message if rule processing doesn't complete' checked" in text


def test_powershell_quoting() -> None:
    assert planmod.ps_value("O'Brien's") == "'O''Brien''s'"
    assert planmod.ps_value([True, 3, "a"]) == "@($true,3,'a')"


def test_tenants_add(tmp_path: Path, pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support import make_deployment

    dep = make_deployment(tmp_path, pki_from=pki_dir)
    rc = cli.main(["tenants", "add", "northwind", "-c", str(dep.config_path), "--id",
                   "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d", "--initial-domain", "northwind.onmicrosoft.com",
                   "--domain", "northwind.example", "--region", "de"])
    out = capsys.readouterr().out
    assert rc == 0, out
    t = dep.load().tenant_by_name("northwind")
    assert t is not None and t.region == "de" and t.subdomain.startswith("northwind-")
    assert t.certificate_name == f"{t.subdomain}.de-smtp.signature-relay.test"
    assert f"smart host (outbound connector):        {t.subdomain}.de-smtp.signature-relay.test" in out
    assert t.client_cert.exists() and "dev client certificate" in out
    assert cli.main(["tenants", "add", "northwind", "-c", str(dep.config_path), "--id",
                     "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d", "--initial-domain", "x.onmicrosoft.com"]) == 2


def test_group_types_and_mail_are_checked(tmp_path: Path) -> None:
    from relay.directory import DirectoryError, load

    (tmp_path / "groups.toml").write_text('[[group]]\nname = "A"\nmail = "nope"\ngroupTypes = "Unified"\n'
                                          'members = []\n')
    with pytest.raises(DirectoryError) as e:
        load(tmp_path)
    text = str(e.value)
    assert "group[0].mail: expected an address" in text and "group[0].groupTypes: expected a list" in text
    (tmp_path / "groups.toml").write_text('[[group]]\nname = "A"\nmail = "A@Contoso.com"\ngroupTypes = ["Unified"]\n'
                                          'members = []\n')
    g = load(tmp_path).groups["a"]
    assert g.microsoft365 and g.mail == "a@contoso.com"
