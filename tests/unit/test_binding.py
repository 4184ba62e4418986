from __future__ import annotations

from pathlib import Path

import pytest

from relay import binding, config
from tests.support import CONTOSO_ID, FABRIKAM_ID, make_deployment, message


@pytest.fixture
def cfg(tmp_path: Path, pki_dir: Path) -> config.Config:
    return make_deployment(tmp_path, pki_from=pki_dir, sender_domain_binding=False).load()


@pytest.fixture
def dev_cfg(tmp_path: Path, pki_dir: Path) -> config.Config:
    return make_deployment(tmp_path / "dev", pki_from=pki_dir, sender_domain_binding=True).load()


def hdr(tid: str) -> str:
    return f"X-MS-Exchange-CrossTenant-Id: {tid}\r\n"


def test_binds_by_cross_tenant_id(cfg: config.Config) -> None:
    b = binding.bind(cfg, "alice@contoso.com", message(extra_headers=hdr(CONTOSO_ID.upper())))
    assert (b.tenant.name, b.how) == ("contoso", "cross-tenant-id")


def test_unknown_tenant_id_is_refused_generically(cfg: config.Config) -> None:
    with pytest.raises(binding.Unbound) as e:
        binding.bind(cfg, "alice@contoso.com", message(extra_headers=hdr("11111111-2222-3333-4444-555555555555")))
    assert str(e.value.reply) == "550 5.7.1 Relaying denied: message not from a served organization"
    assert "not a configured tenant" in e.value.detail  # detail is for the log only


def test_two_cross_tenant_ids_are_refused(cfg: config.Config) -> None:
    with pytest.raises(binding.Unbound, match="2 X-MS-Exchange-CrossTenant-Id"):
        binding.bind(cfg, "alice@contoso.com", message(extra_headers=hdr(CONTOSO_ID) + hdr(CONTOSO_ID)))


def test_tenant_b_claiming_tenant_a_domain_is_refused(cfg: config.Config) -> None:
    """Fabrikam's message (its id) with a contoso.com envelope sender: cross-tenant spoofing."""
    with pytest.raises(binding.Unbound, match="not an accepted domain of tenant 'fabrikam'"):
        binding.bind(cfg, "ceo@contoso.com", message(extra_headers=hdr(FABRIKAM_ID)))


def test_null_sender_needs_the_header(cfg: config.Config) -> None:
    assert binding.bind(cfg, "", message(extra_headers=hdr(CONTOSO_ID))).tenant.name == "contoso"
    with pytest.raises(binding.Unbound, match="null sender"):
        binding.bind(cfg, "", message())


def test_sender_domain_binding_only_when_enabled(cfg: config.Config, dev_cfg: config.Config) -> None:
    with pytest.raises(binding.Unbound, match="requires it"):
        binding.bind(cfg, "alice@contoso.com", message())
    b = binding.bind(dev_cfg, "alice@CONTOSO.com", message())
    assert (b.tenant.name, b.how) == ("contoso", "sender-domain")


def test_check_sender_at_mail_from(cfg: config.Config) -> None:
    binding.check_sender(cfg, "alice@contoso.com")
    binding.check_sender(cfg, "")  # null sender decided after DATA
    binding.check_sender(cfg, "x@contoso.onmicrosoft.com")  # initial domain is always accepted
    for stranger in ("spammer@example.org", "user%contoso.com@evil.test", "contoso.com!user@evil.test",
                     "no-at-sign"):
        with pytest.raises(binding.Unbound):
            binding.check_sender(cfg, stranger)


def test_from_header_must_be_the_tenants(cfg: config.Config) -> None:
    raw = message(frm="ceo@fabrikam.com", extra_headers=hdr(CONTOSO_ID))
    with pytest.raises(binding.Unbound, match="From: domain"):
        binding.bind(cfg, "alice@contoso.com", raw)
    two = message(extra_headers=hdr(CONTOSO_ID)).replace(b"From: Alice <alice@contoso.com>",
                                                         b"From: a@contoso.com, b@evil.example")
    with pytest.raises(binding.Unbound, match="From: domain"):
        binding.bind(cfg, "alice@contoso.com", two)


def test_from_check_can_be_turned_off_per_tenant(tmp_path: Path, pki_dir: Path) -> None:
    d = make_deployment(tmp_path, pki_from=pki_dir)
    f = tmp_path / "rules" / "contoso" / "tenant.toml"
    f.write_text(f.read_text() + "\n[binding]\nrequire_from_domain = false\n")
    c = d.load()
    raw = message(frm="someone@external.example", extra_headers=hdr(CONTOSO_ID))
    assert binding.bind(c, "alice@contoso.com", raw).tenant.name == "contoso"


def test_sni_must_agree_with_the_tenant(cfg: config.Config) -> None:
    raw = message(extra_headers=hdr(CONTOSO_ID))
    ok = binding.Peer(sni="contoso-7q4k2m.smtp.signature-relay.test")
    assert binding.bind(cfg, "alice@contoso.com", raw, ok).tenant.name == "contoso"
    for other in ("fabrikam-2b9x1k.smtp.signature-relay.test", "contoso-7q4k2m.de-smtp.signature-relay.test"):
        with pytest.raises(binding.Unbound, match="SNI"):
            binding.bind(cfg, "alice@contoso.com", raw, binding.Peer(sni=other))
    # generic names say nothing about the tenant
    binding.bind(cfg, "alice@contoso.com", raw, binding.Peer(sni="smtp.signature-relay.test"))


def test_tenant_layers_networks_and_client_cert(tmp_path: Path, pki_dir: Path) -> None:
    d = make_deployment(tmp_path, pki_from=pki_dir)
    f = tmp_path / "rules" / "contoso" / "tenant.toml"
    f.write_text(f.read_text() + '\n[binding]\nnetworks = ["40.92.0.0/15"]\nrequire_client_cert = true\n')
    c = d.load()
    raw = message(extra_headers=hdr(CONTOSO_ID))
    good = binding.Peer(ip="40.93.1.2", cert_names=("mail.protection.outlook.com",))
    assert binding.bind(c, "alice@contoso.com", raw, good).tenant.name == "contoso"
    with pytest.raises(binding.Unbound, match="networks"):
        binding.bind(c, "alice@contoso.com", raw, binding.Peer(ip="192.0.2.1", cert_names=good.cert_names))
    with pytest.raises(binding.Unbound, match="client certificate"):
        binding.bind(c, "alice@contoso.com", raw, binding.Peer(ip="40.93.1.2", cert_names=("evil.example",)))


def test_exchange_online_ranges_are_the_production_default(tmp_path: Path, pki_dir: Path) -> None:
    d = make_deployment(tmp_path, pki_from=pki_dir)
    d.config_path.write_text(d.config_path.read_text().replace(
        'allowed_networks = ["127.0.0.0/8", "::1/128"]\n', ""))
    nets = [str(n) for n in d.load().security.allowed_networks]
    assert nets == list(config.EXO_NETWORKS)
