"""Provisioning against a local HTTPS emulator of the Exchange Online admin API (issue #6)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay import certs, cli, config
from relay.provisioning import plan as planmod
from tests.exo_emulator import Emulator, ExoState
from tests.support import CONTOSO_ID, Deployment, make_deployment

APP_ID = "6c1a7f5e-0d2b-4e8a-9b3f-2a4c5d6e7f80"
CERT_DOMAIN = "contoso-7q4k2m.smtp.signature-relay.test"
SALES = '[[group]]\nname = "Sales"\nmembers = []\n'


def app_pem(cfg: config.Config, name: str, path: Path) -> x509.Certificate:
    """An app registration's certificate (issued by the dev CA) with its key, as one PEM file."""
    ca = certs.load_pair(cfg.certs.ca_cert, cfg.certs.ca_key)
    cert, key = certs.issue(*ca, [name], 30, server=False, client=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
    return cert


@pytest.fixture
def env(tmp_path: Path, pki_dir: Path) -> Iterator[tuple[Deployment, Emulator, list[str]]]:
    dep = make_deployment(tmp_path, pki_from=pki_dir)
    (tmp_path / "rules" / "contoso" / "groups.toml").write_text(SALES)
    cfg = dep.load()
    pem = tmp_path / "app.pem"
    app_cert = app_pem(cfg, "signature-relay-provisioning", pem)
    state = ExoState(CONTOSO_ID, APP_ID, app_cert, ["contoso.com", "contoso.onmicrosoft.com", "fabrikam.net",
                                                    CERT_DOMAIN, "contoso.mail.onmicrosoft.com"])
    with Emulator(state, cfg.tls.cert, cfg.tls.key) as emu:
        base = f"https://127.0.0.1:{emu.port}"
        args = ["-c", str(dep.config_path), "--tenant", "contoso", "--app-id", APP_ID, "--certificate", str(pem),
                "--admin-url", base, "--login-url", base, "--ca-bundle", str(cfg.certs.ca_cert)]
        yield dep, emu, args


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_apply_creates_exactly_the_plan_then_changes_nothing(env: tuple[Deployment, Emulator, list[str]],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    dep, emu, args = env
    rc, out, err = run(capsys, "connectors", "apply", *args)
    assert rc == 0, err
    plan = planmod.build(dep.load(), dep.load().tenants[0])
    st = emu.state
    assert set(st.objects) == {(o.kind, o.name.lower()) for o in plan.objects}
    for o in plan.objects:
        stored = st.objects[(o.kind, o.name.lower())]
        assert {k: stored[k] for k in o.new_params()} == o.new_params()
    out_conn = st.objects[("OutboundConnector", plan.outbound.name.lower())]
    assert out_conn["IsValidated"] is True and out_conn["ValidationRecipients"] == ["validation@example.com"]
    assert [c for c in st.mutations()] == ["New-InboundConnector", "New-OutboundConnector",
                                           "Validate-OutboundConnector", "Set-OutboundConnector", "New-TransportRule"]
    assert "[1/5] Checking the certificate domain" in out and "propagate" in out
    assert "warning from Exchange Online: The transport rule may take up to 30 minutes" in out
    assert st.token_requests >= 1
    # paging: 5 accepted domains in pages of 2 = 3 POSTs of the same body, the last page holding the
    # certificate domain the check needs
    assert [c for c, _ in st.calls].count("Get-AcceptedDomain") == 3
    before = len(st.mutations())
    rc, out, _ = run(capsys, "connectors", "apply", *args)
    assert rc == 0 and len(st.mutations()) == before  # second run: no state-changing call
    assert out.count("': already as planned") == 3
    rc, out, _ = run(capsys, "connectors", "check", *args)
    assert rc == 0 and "OK: tenant contoso matches the plan" in out


def test_drift_is_reported_and_fixed_and_remove_goes_in_order(env: tuple[Deployment, Emulator, list[str]],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    _, emu, args = env
    assert run(capsys, "connectors", "apply", *args)[0] == 0
    st = emu.state
    st.objects[("InboundConnector", "signature relay inbound connector 2.0")]["RequireTls"] = False
    st.objects[("OutboundConnector", "signature relay outbound connector")]["SmartHosts"] = ["evil.example"]
    del st.objects[("TransportRule", "signature relay exchange transport rule")]
    rc, out, _ = run(capsys, "connectors", "check", *args)
    assert rc == 1
    assert "InboundConnector 'Signature Relay Inbound Connector 2.0': RequireTls is False, should be True. Fix: " \
           "Set-InboundConnector -Identity 'Signature Relay Inbound Connector 2.0' -RequireTls $true" in out
    assert "SmartHosts is ['evil.example'], should be ['contoso-7q4k2m.smtp.signature-relay.test']" in out
    assert "TransportRule 'Signature Relay Exchange transport rule' is missing" in out
    assert "3 problem(s)" in out
    n = len(st.calls)
    rc, out, _ = run(capsys, "connectors", "apply", *args)
    assert rc == 0
    assert [c for c, _ in st.calls[n:] if not c.startswith("Get-")] == [
        "Set-InboundConnector", "Set-OutboundConnector", "Validate-OutboundConnector", "Set-OutboundConnector",
        "New-TransportRule"]
    assert run(capsys, "connectors", "check", *args)[0] == 0
    n = len(st.calls)
    rc, out, _ = run(capsys, "connectors", "remove", *args)
    assert rc == 0 and st.objects == {}
    assert [c for c, _ in st.calls[n:] if c.startswith("Remove-")] == [
        "Remove-TransportRule", "Remove-OutboundConnector", "Remove-InboundConnector"]


def test_dry_run_changes_nothing(env: tuple[Deployment, Emulator, list[str]],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _, emu, args = env
    rc, out, _ = run(capsys, "connectors", "apply", "--dry-run", *args)
    assert rc == 0 and emu.state.mutations() == [] and emu.state.objects == {}
    assert "would create" in out and "3 object(s) would change" in out


def test_certificate_domain_must_be_accepted(env: tuple[Deployment, Emulator, list[str]],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, emu, args = env
    emu.state.accepted_domains.remove(CERT_DOMAIN)
    rc, _, err = run(capsys, "connectors", "apply", *args)
    assert rc == 1 and "is not within an accepted domain" in err and "Settings → Domains" in err
    assert emu.state.mutations() == []


@pytest.mark.parametrize(("inject", "code", "text"), [
    ("401", 3, "401 Unauthorized — the token was not accepted. The app registration needs the Office 365 Exchange "
               "Online application permission Exchange.ManageAsApp"),
    ("403", 3, "403 Forbidden — the app signed in but may not run this cmdlet. Assign its service principal the "
               "Exchange Administrator role"),
    # #13 defect 6: "could not check" (6) is not "drift found" (1)
    ("error", 6, "Exchange Online refused (400, BadRequest): The connector couldn't be saved because TlsDomain is "
                 "invalid."),
    ("302-loop", 4, "redirected more than 3 times (a redirect loop); check --admin-url"),
    ("302-http", 4, "refused to follow a redirect to http://127.0.0.1 (only https to 127.0.0.1 or an Exchange "
                    "Online host of the global cloud); the sign-in token was not sent there"),
    ("302-foreign", 4, "refused to follow a redirect to https://attacker.example"),
    ("html", 4, "127.0.0.1 answered HTTP 502 with a web page (502 Bad Gateway) instead of the admin API"),
])
def test_errors_are_explained_with_exit_codes(env: tuple[Deployment, Emulator, list[str]],
                                              capsys: pytest.CaptureFixture[str], inject: str, code: int,
                                              text: str) -> None:
    _, emu, args = env
    emu.state.inject = [inject]
    rc, _, err = run(capsys, "connectors", "check", *args)
    assert rc == code and text in err, err


def test_throttling_and_regional_redirect_are_handled(env: tuple[Deployment, Emulator, list[str]],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, emu, args = env
    emu.state.inject = ["429", "302", "429"]
    rc, out, err = run(capsys, "connectors", "apply", *args)
    assert rc == 0, err
    assert out.count("throttled (429), retrying") == 2 and "redirected to 127.0.0.1" in out
    assert len(emu.state.objects) == 3


def test_persistent_throttling_gives_up_with_advice(env: tuple[Deployment, Emulator, list[str]],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _, emu, args = env
    emu.state.inject = ["429"] * 10
    rc, _, err = run(capsys, "connectors", "check", *args)
    assert rc == 5 and "still throttled after 5 retries; try again later" in err


def test_bad_app_certificate_is_a_sign_in_error(env: tuple[Deployment, Emulator, list[str]], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    dep, _, args = env
    pem = tmp_path / "other.pem"
    app_pem(dep.load(), "someone-else", pem)
    args = [a if a != str(tmp_path / "app.pem") else str(pem) for a in args]
    rc, _, err = run(capsys, "connectors", "check", *args)
    assert rc == 3 and "Sign-in failed for app" in err and "AADSTS700027" in err


# --- issue #13 -------------------------------------------------------------------------------------

RULE = "Signature Relay Exchange transport rule"


def test_a_disabled_rule_is_reported_and_re_enabled(env: tuple[Deployment, Emulator, list[str]],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """#13 defect 1: after Disable-TransportRule behind the tool's back, check used to say OK."""
    _, emu, args = env
    assert run(capsys, "connectors", "apply", *args)[0] == 0
    st = emu.state
    assert st.objects[("TransportRule", RULE.lower())]["State"] == "Enabled"
    st.objects[("TransportRule", RULE.lower())]["State"] = "Disabled"  # what Disable-TransportRule does
    rc, out, _ = run(capsys, "connectors", "check", *args)
    assert rc == 1
    assert (f"TransportRule '{RULE}': State is 'Disabled', should be 'Enabled'. "
            f"Fix: Enable-TransportRule -Identity '{RULE}'") in out
    n = len(st.calls)
    assert run(capsys, "connectors", "apply", *args)[0] == 0
    assert [c for c, _ in st.calls[n:] if not c.startswith("Get-")] == ["Enable-TransportRule"]
    assert st.objects[("TransportRule", RULE.lower())]["State"] == "Enabled"
    assert run(capsys, "connectors", "check", *args)[0] == 0


def test_a_failed_validation_task_stops_apply_and_is_not_marked_validated(
        env: tuple[Deployment, Emulator, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    """#13 defect 2: the result is per task (TaskName, IsTaskSuccessful); a failed task used to
    pass because the wizard looked for a Status field the cmdlet does not return."""
    _, emu, args = env
    emu.state.validation_fails = True
    rc, out, err = run(capsys, "connectors", "apply", *args)
    assert rc == 1
    assert "Establish TLS connection: FAILED (TLS with the smart host failed (emulated failure))" in out
    assert "Resolve smart host: ok" in out
    assert "Validation of 'Signature Relay Outbound Connector' failed: Establish TLS connection" in err
    assert "NOT marked validated" in err and "Validate this connector" in err
    connector = emu.state.objects[("OutboundConnector", "signature relay outbound connector")]
    assert connector["IsValidated"] is False
    assert [p for c, p in emu.state.calls if c == "Set-OutboundConnector"] == [
        {"Identity": "Signature Relay Outbound Connector", "IsValidated": False}]
    emu.state.validation_fails = False  # the admin fixes the relay's certificate
    assert run(capsys, "connectors", "apply", *args)[0] == 0
    assert connector["IsValidated"] is True


def test_widening_the_scope_clears_conditions_and_remove_takes_every_optional_rule(
        env: tuple[Deployment, Emulator, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    """#13 defect 3 and the scenario of "What it must show" 2: narrow, widen, disable behind the
    tool's back, validate with a failing task — each step reported or corrected."""
    _, emu, args = env
    st = emu.state
    narrow = ["--scope", "group:Sales", "--exclude-internal", "--size-cap", "1000000", "--except-oof"]
    assert run(capsys, "connectors", "apply", *args, *narrow)[0] == 0
    rule = st.objects[("TransportRule", RULE.lower())]
    assert (rule["FromMemberOf"], rule["SentToScope"], rule["ExceptIfMessageSizeOver"]) == (
        ["Sales"], "NotInOrganization", 1000000)
    # widen: check names each condition that must go, with the command that clears it
    rc, out, _ = run(capsys, "connectors", "check", *args)
    assert rc == 1
    assert (f"TransportRule '{RULE}': FromMemberOf is ['Sales'], should be None. "
            f"Fix: Set-TransportRule -Identity '{RULE}' -FromMemberOf $null") in out
    assert "SentToScope is 'NotInOrganization', should be None" in out
    assert "ExceptIfMessageSizeOver is '976.6 KB (1,000,000 bytes)', should be None" in out  # as Get- shows it
    assert run(capsys, "connectors", "apply", *args)[0] == 0
    assert (rule["FromMemberOf"], rule["SentToScope"], rule["ExceptIfMessageSizeOver"]) == (None, None, None)
    assert run(capsys, "connectors", "check", *args)[0] == 0
    # disabled behind the tool's back, then a validation that fails
    rule["State"] = "Disabled"
    st.objects[("OutboundConnector", "signature relay outbound connector")]["SmartHosts"] = ["old.example"]
    st.validation_fails = True
    rc, out, err = run(capsys, "connectors", "apply", *args)
    assert rc == 1 and "Establish TLS connection: FAILED" in out and "NOT marked validated" in err
    assert st.objects[("OutboundConnector", "signature relay outbound connector")]["IsValidated"] is False
    rc, out, _ = run(capsys, "connectors", "check", *args)
    assert rc == 1 and "is not validated" in out and "State is 'Disabled'" in out
    st.validation_fails = False
    assert run(capsys, "connectors", "apply", *args)[0] == 0
    assert rule["State"] == "Enabled" and run(capsys, "connectors", "check", *args)[0] == 0
    # remove without --except-oof still removes the out-of-office rule the narrow apply created
    assert ("TransportRule", "signature relay out-of-office exception") in st.objects
    assert run(capsys, "connectors", "remove", *args)[0] == 0
    assert st.objects == {}


@pytest.mark.parametrize("status", ["408", "503", "504"])
def test_transient_server_errors_are_retried(env: tuple[Deployment, Emulator, list[str]],
                                             capsys: pytest.CaptureFixture[str], status: str) -> None:
    _, emu, args = env
    emu.state.inject = [status, status]
    rc, out, err = run(capsys, "connectors", "apply", *args)
    assert rc == 0, err
    assert out.count(f"({status}), retrying in 0 s") == 2 and len(emu.state.objects) == 3


def test_retry_after_is_capped() -> None:
    import httpx

    from relay.provisioning.api import MAX_RETRY_AFTER, _retry_after

    r = httpx.Response(429, headers={"Retry-After": "86400"})
    assert _retry_after(r, 0) == MAX_RETRY_AFTER == 120.0


def test_cloud_sets_admin_url_login_and_token_scope_together(env: tuple[Deployment, Emulator, list[str]],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """#13 defect 5: the token scope used to be the worldwide one whatever --admin-url said."""
    from relay.provisioning.api import CLOUDS, AdminApi, ApiError

    _, emu, args = env
    assert run(capsys, "connectors", "check", *args, "--cloud", "gcc-high")[0] in (0, 1)
    assert emu.state.scopes[-1] == "https://outlook.office365.us/.default"
    assert run(capsys, "connectors", "check", *args, "--cloud", "china")[0] in (0, 1)
    assert emu.state.scopes[-1] == "https://partner.outlook.cn/.default"
    assert (CLOUDS["dod"].admin_url, CLOUDS["dod"].login_url) == ("https://webmail.apps.mil",
                                                                  "https://login.microsoftonline.us")
    # a redirect may only lead to the selected cloud's hosts
    api = AdminApi(base_url=CLOUDS["gcc-high"].admin_url, tenant="t", token=lambda: "x", cloud=CLOUDS["gcc-high"])
    assert api._redirect_target("https://outlook.office365.us/a", "https://nam.outlook.office365.us/b", "Get-X", 1)
    with pytest.raises(ApiError, match="gcc-high cloud"):
        api._redirect_target("https://outlook.office365.us/a", "https://outlook.office365.com/b", "Get-X", 1)
    api.close()


def test_plan_states_the_accepted_domain_prerequisite_and_fixes_carry_every_flag(
        env: tuple[Deployment, Emulator, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    """#13 defect 7 (part): what apply enforces is in the plan, with why; a "Fix:" is a command an
    admin can paste (a bare `apply` would widen a narrowed scope)."""
    dep, _, args = env
    for fmt, needle in (("text", "0. Prerequisite: the certificate domain " + CERT_DOMAIN),
                        ("powershell", "# Check: Get-AcceptedDomain | Where-Object"),
                        ("json", '"prerequisites": [')):
        rc, out, _ = run(capsys, "connectors", "plan", "-c", str(dep.config_path), "--tenant", "contoso",
                         "--format", fmt)
        assert rc == 0 and needle in out and "accepted" in out
    narrow = ["--scope", "group:Sales", "--size-cap", "1000000", "--except-oof"]
    rc, out, _ = run(capsys, "connectors", "check", *args, *narrow)
    assert rc == 1
    fix = next(line for line in out.splitlines() if "is missing. Fix: " in line).split("Fix: ", 1)[1]
    assert fix.startswith(f"signature-relay connectors apply -c {dep.config_path} --tenant contoso --app-id {APP_ID}")
    assert "--scope group:Sales --size-cap 1000000 --except-oof" in fix and "--certificate" in fix
    rc, _, err = run(capsys, *fix.split()[1:])  # pasting it works
    assert rc == 0, err
    assert run(capsys, "connectors", "check", *args, *narrow)[0] == 0


def test_an_unknown_group_in_scope_is_an_error(env: tuple[Deployment, Emulator, list[str]],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """#13 defect 7: a misspelt group used to plan a rule scoped to nobody ("unknown number of senders")."""
    dep, emu, args = env
    rc, _, err = run(capsys, "connectors", "plan", "-c", str(dep.config_path), "--tenant", "contoso",
                     "--scope", "group:Salse")
    assert rc == 2 and "group 'Salse' is not in tenant contoso's directory (groups: sales)" in err
    rc, _, err = run(capsys, "connectors", "apply", *args, "--scope", "group:Salse")
    assert rc == 2 and emu.state.mutations() == []


M365 = ('[[group]]\nname = "Sales"\nmembers = []\n\n'
        '[[group]]\nname = "Project Falcon"\nmail = "falcon@contoso.com"\ngroupTypes = ["Unified"]\nmembers = []\n\n'
        '[[group]]\nname = "All Staff"\nmail = "allstaff@contoso.com"\nmembers = []\n')


def test_recall_rules_match_the_documented_signals_and_m365_groups_can_be_excluded(
        env: tuple[Deployment, Emulator, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    """#13 defect 7: recall requests carry the message class IPM.Outlook.Recall (not a MIME header,
    MS-OXCMAIL) and the subject "Recall: …" (Learn, cloud-based message recall); mail sent as a
    Microsoft 365 group (groupTypes Unified) can be kept away from the relay."""
    dep, emu, args = env
    (dep.config_path.parent / "rules" / "contoso" / "groups.toml").write_text(M365)
    st = emu.state
    flags = ["--except-recall", "--recall-subject", "Recall:", "--recall-subject", "Rückruf:",
             "--except-m365-groups"]
    rc, out, err = run(capsys, "connectors", "apply", *args, *flags)
    assert rc == 0, err
    content = st.objects[("TransportRule", "signature relay message recall exception")]
    subject = st.objects[("TransportRule", "signature relay message recall exception (subject)")]
    assert (content["HeaderMatchesMessageHeader"], content["HeaderMatchesPatterns"]) == ("Content-Class", ["recall"])
    assert subject["SubjectMatchesPatterns"] == ["^Recall:", "^Rückruf:"]
    assert subject["SetHeaderName"] == "X-CodeTwoProcessed" and (content["Priority"], subject["Priority"]) == (0, 1)
    main = st.objects[("TransportRule", RULE.lower())]
    # only the Unified group, anchored and escaped; a plain distribution group keeps its signature
    assert main["ExceptIfFromAddressMatchesPatterns"] == ["<>", r"^falcon@contoso\.com$"]
    assert main["Priority"] == 2
    assert run(capsys, "connectors", "check", *args, *flags)[0] == 0
    # without the option the group pattern is drift that apply removes
    rc, out, _ = run(capsys, "connectors", "check", *args, "--except-recall")
    assert rc == 1 and "ExceptIfFromAddressMatchesPatterns" in out
    assert run(capsys, "connectors", "apply", *args, "--except-recall")[0] == 0
    assert main["ExceptIfFromAddressMatchesPatterns"] == ["<>"]
    # the plan says why the subject rule exists and what it costs
    rc, out, _ = run(capsys, "connectors", "plan", "-c", str(dep.config_path), "--tenant", "contoso",
                     "--format", "text", *flags)
    assert rc == 0 and "IPM.Outlook.Recall" in out and "falcon@contoso.com" in out
    assert "if the subject matches ^Recall:, ^Rückruf:, set the message header X-CodeTwoProcessed" in out
    assert r"Except if: the sender address matches '<>', '^falcon@contoso\.com$'" in out
    # remove takes the subject rule too, whatever flags it is given
    assert run(capsys, "connectors", "remove", *args)[0] == 0
    assert st.objects == {}


def test_except_m365_groups_without_any_such_group_is_an_error(env: tuple[Deployment, Emulator, list[str]],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    _, emu, args = env
    rc, _, err = run(capsys, "connectors", "apply", *args, "--except-m365-groups")
    assert rc == 2 and "no Microsoft 365 group with an address" in err and 'groupTypes = ["Unified"]' in err
    assert emu.state.mutations() == []
