"""What a tenant needs in Exchange Online, as data (pure): two connectors and the transport rule.

Mirrors the product documentation's manual steps (``reference/connectors-configuration.txt``) and
the cmdlet facts in ``reference/exchange-online.md``. The same :class:`Plan` is printed as
admin-center steps, as PowerShell, as JSON, applied through the admin API and checked against it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

from relay.config import Config, Tenant

BRAND = "Signature Relay"
# Exclaimer's default cap: larger messages skip the relay (Exchange Online's own limit is 150 MB).
DEFAULT_SIZE_CAP = 23_592_960

# Outlook's recall request subject, "Recall: <original subject>" (Learn, Work with Cloud-based
# Message Recall). Localised Outlook writes a localised prefix: add it with --recall-subject.
RECALL_SUBJECTS: Final = ("Recall:",)


@dataclass(frozen=True)
class Obj:
    """One Exchange Online object: its kind (cmdlet noun) and the parameters New-/Set- take."""

    kind: str  # "InboundConnector", "OutboundConnector", "TransportRule"
    name: str
    params: dict[str, Any]
    gui: tuple[str, ...] = ()  # the same settings as an admin types them in the admin center
    # Parameters this plan manages that must be empty: an earlier, narrower apply may have set
    # them (a group scope, internal exclusion, size cap), and the scope could never widen again.
    absent: tuple[str, ...] = ()

    def new_params(self) -> dict[str, Any]:
        return {"Name": self.name, **self.params}


@dataclass(frozen=True)
class Plan:
    tenant: str
    objects: tuple[Obj, ...]
    smart_host: str
    certificate_name: str
    tls_domain: str
    scope: str
    senders_in_scope: int | None
    notes: tuple[str, ...] = field(default=())

    @property
    def inbound(self) -> Obj:
        return next(o for o in self.objects if o.kind == "InboundConnector")

    @property
    def outbound(self) -> Obj:
        return next(o for o in self.objects if o.kind == "OutboundConnector")

    @property
    def rules(self) -> list[Obj]:
        return [o for o in self.objects if o.kind == "TransportRule"]


def build(  # noqa: PLR0913 -- keyword-only options, one per CLI flag
        cfg: Config, tenant: Tenant, *, scope: str = "all", exclude_internal: bool = False,
        size_cap: int | None = None, except_oof: bool = False, except_recall: bool = False,
        recall_subjects: tuple[str, ...] = RECALL_SUBJECTS, except_m365_groups: bool = False,
        brand: str = BRAND) -> Plan:
    """``scope`` is ``all`` or ``group:<name>`` (a distribution or hidden group).
    ``except_m365_groups`` keeps mail sent as a Microsoft 365 group (``groupTypes = ["Unified"]``
    in ``groups.toml``) away from the relay: the group is not a person with a signature."""
    if scope != "all" and not scope.startswith("group:"):
        raise ValueError("scope must be 'all' or 'group:<name>'")
    group = scope[6:].strip() if scope.startswith("group:") else None
    if group == "":
        raise ValueError("scope group:<name> needs a group name")
    if group and tenant.policy is not None and group.lower() not in tenant.policy.directory.members:
        # A misspelt group would scope the rule to nobody: stamping silently stops (issue #13).
        known = ", ".join(sorted(tenant.policy.directory.members)) or "none"
        raise ValueError(f"group {group!r} is not in tenant {tenant.name}'s directory (groups: {known}); "
                         f"add it to rules/{tenant.name}/groups.toml or fix the name")
    smart_host = f"{tenant.subdomain}.{'de-smtp' if tenant.region == 'de' else 'smtp'}.{cfg.service_domain}"
    tls_domain = f"*.{cfg.service_domain}"
    header = cfg.processed_header
    inbound, outbound = _connectors(tenant, brand, smart_host, tls_domain)
    rules = _exception_rules(brand, header, except_oof, except_recall, recall_subjects)
    m365 = _m365_group_mails(tenant) if except_m365_groups else ()
    rules.append(_main_rule(brand, header, outbound.name, group, exclude_internal, size_cap, priority=len(rules),
                            except_from=m365))
    notes: tuple[str, ...] = (
        "Every sender in the transport rule's scope uses one licence, whether or not a signature rule applies.",
        "Exchange Online's '<>' sender-address exception does not reliably match an empty sender (Microsoft "
        "documents this); the relay itself passes null-sender mail through unstamped, so nothing is lost.",
        "Changes to connectors and rules can take from a few minutes to more than an hour to propagate.",
    )
    if except_recall:
        notes += (
            "Recall: Outlook's recall request has message class IPM.Outlook.Recall and the subject 'Recall: "
            "<original subject>' (learn.microsoft.com/exchange/mail-flow-best-practices/work-with-cloud-based-"
            "message-recall). Exchange does not copy the message class into a MIME header ([MS-OXCMAIL]: a pure "
            "MIME writer leaves PidTagMessageClass out; TNEF carries it as attMessageClass, and the relay passes "
            "TNEF through untouched), so one rule matches a recall Content-Class "
            "(urn:content-classes:recallmessage or recallreport) and one the subject prefix. A user's own message "
            "whose subject starts with one of those prefixes also goes unstamped; add localised prefixes with "
            "--recall-subject (Outlook writes the prefix in the sender's language).",)
    if m365:
        notes += (f"Mail sent as a Microsoft 365 group is excluded: {', '.join(m365)}. The list is fixed in the "
                  "rule; run apply again after adding a group (check reports the difference).",)
    return Plan(tenant.name, (inbound, outbound, *rules), smart_host, tenant.certificate_name, tls_domain,
                scope, _in_scope(tenant, group), notes)


def _connectors(tenant: Tenant, brand: str, smart_host: str, tls_domain: str) -> tuple[Obj, Obj]:
    inbound = Obj("InboundConnector", f"{brand} Inbound Connector 2.0", {
        "ConnectorType": "OnPremises", "SenderDomains": ["*"], "TlsSenderCertificateName": tenant.certificate_name,
        "RequireTls": True, "RestrictDomainsToCertificate": True, "CloudServicesMailEnabled": True, "Enabled": True,
    }, gui=(
        "Connectors → Add a connector: From 'Your organization's email server', To 'Office 365'",
        f"Name: {brand} Inbound Connector 2.0; 'Turn it on' and 'Retain internal Exchange email headers' checked",
        f"Authenticate by certificate: the subject name is {tenant.certificate_name}",
    ))
    outbound = Obj("OutboundConnector", f"{brand} Outbound Connector", {
        "ConnectorType": "OnPremises", "IsTransportRuleScoped": True, "UseMXRecord": False,
        "SmartHosts": [smart_host], "TlsSettings": "DomainValidation", "TlsDomain": tls_domain,
        "CloudServicesMailEnabled": True, "RouteAllMessagesViaOnPremises": False, "Enabled": True,
    }, gui=(
        "Connectors → Add a connector: From 'Office 365', To 'Your organization's email server'",
        f"Name: {brand} Outbound Connector; 'Turn it on' and 'Retain internal Exchange email headers' checked",
        "Use of connector: 'Only when I have a transport rule set up that redirects messages to this connector'",
        f"Routing: smart host {smart_host} (port 25)",
        f"Security: 'Always use TLS', 'Issued by a trusted CA and the subject name matches': {tls_domain}",
        "Validate with any external address, then Save",
    ))
    return inbound, outbound


def recall_patterns(prefixes: tuple[str, ...]) -> list[str]:
    r"""Anchored SubjectMatchesPatterns for the prefixes (Exchange's pattern syntax is a regex subset:
    ``^``, ``\s``, escaped punctuation)."""
    return [f"^{re.escape(p.strip()).replace(chr(92) + ' ', chr(92) + 's')}" for p in prefixes if p.strip()]


def _m365_group_mails(tenant: Tenant) -> tuple[str, ...]:
    groups = tenant.policy.directory.groups.values() if tenant.policy else ()
    mails = tuple(sorted(g.mail for g in groups if g.microsoft365 and g.mail))
    if not mails:
        raise ValueError(f"--except-m365-groups: tenant {tenant.name}'s directory has no Microsoft 365 group with "
                         f"an address; mark them in rules/{tenant.name}/groups.toml with groupTypes = [\"Unified\"] "
                         "and mail = \"...\"")
    return mails


def _exception_rules(brand: str, header: str, except_oof: bool, except_recall: bool,
                     recall_subjects: tuple[str, ...] = RECALL_SUBJECTS) -> list[Obj]:
    rules: list[Obj] = []
    priority = 0
    subjects = recall_patterns(recall_subjects)
    for enabled, suffix, cond, what in (
        (except_oof, "out-of-office exception", {"MessageTypeMatches": "OOF"}, "automatic replies"),
        # Content-Class of a recall request or report (urn:content-classes:recallmessage / recallreport)
        # where a MIME writer sets it.
        (except_recall, "message recall exception",
         {"HeaderMatchesMessageHeader": "Content-Class", "HeaderMatchesPatterns": ["recall"]},
         "the message header 'Content-Class' matches 'recall'"),
        # The documented signal that survives MIME conversion: the subject prefix.
        (except_recall and bool(subjects), "message recall exception (subject)",
         {"SubjectMatchesPatterns": subjects}, f"the subject matches {', '.join(subjects)}"),
    ):
        if enabled:
            # A transport rule cannot OR conditions of different kinds: a small rule that marks the
            # message processed keeps it away from the main rule (Exclaimer's approach).
            rules.append(Obj("TransportRule", f"{brand} {suffix}", {
                **cond, "SetHeaderName": header, "SetHeaderValue": "true", "Priority": priority, "Mode": "Enforce",
            }, gui=(f"Rule '{brand} {suffix}': if {what}, set the message header {header} to 'true'",)))
            priority += 1
    return rules


def _main_rule(brand: str, header: str, outbound: str, group: str | None, exclude_internal: bool,
               size_cap: int | None, priority: int, except_from: tuple[str, ...] = ()) -> Obj:
    main: dict[str, Any] = {"FromScope": "InOrganization"}
    if group:
        main["FromMemberOf"] = [group]
    if exclude_internal:
        main["SentToScope"] = "NotInOrganization"
    main |= {
        "RouteMessageOutboundConnector": outbound,
        "ExceptIfHeaderMatchesMessageHeader": header, "ExceptIfHeaderMatchesPatterns": ["true"],
        "ExceptIfMessageTypeMatches": "Calendaring",
        # '<>' (null sender), and each excluded Microsoft 365 group's address, anchored.
        "ExceptIfFromAddressMatchesPatterns": ["<>", *(f"^{re.escape(m)}$" for m in except_from)],
    }
    if size_cap:
        main["ExceptIfMessageSizeOver"] = size_cap
    main |= {"SenderAddressLocation": "HeaderOrEnvelope", "RuleErrorAction": "Defer", "StopRuleProcessing": True,
             "Priority": priority, "Mode": "Enforce"}
    gui = [f"Rules → Add a rule: name '{brand} Exchange transport rule'",
           "Apply this rule if: The sender is located 'Inside the organization'"]
    if group:
        gui.append(f"  and: The sender is a member of '{group}' (hidden groups can be picked too)")
    if exclude_internal:
        gui.append("  and: The recipient is located 'Outside the organization'")
    gui += [f"Do the following: Redirect the message to the connector '{outbound}'",
            "Except if: the sender address matches '<>'" + "".join(f", '^{re.escape(m)}$'" for m in except_from),
            "Except if: the message type is 'Calendaring'",
            f"Except if: the message header '{header}' matches 'true'"]
    if size_cap:
        gui.append(f"Except if: the message size is greater than or equal to {size_cap} bytes")
    gui += ["'Defer the message if rule processing doesn't complete' checked",
            "'Match sender address in message': Header or envelope", "Stop processing more rules; priority " +
            str(priority), "Mode 'Enforce', and the rule turned on (State: Enabled; check reports a disabled rule)"]
    absent = tuple(k for k in ("FromMemberOf", "SentToScope", "ExceptIfMessageSizeOver") if k not in main)
    return Obj("TransportRule", f"{brand} Exchange transport rule", main, gui=tuple(gui), absent=absent)


def optional_rule_names(brand: str = BRAND) -> tuple[str, ...]:
    """Every rule a plan may create besides the main one (``remove`` removes them whatever flags
    it is given: a rule created by an earlier apply must not be left behind)."""
    return (f"{brand} out-of-office exception", f"{brand} message recall exception",
            f"{brand} message recall exception (subject)")


def _in_scope(tenant: Tenant, group: str | None) -> int | None:
    """How many directory users the rule's scope covers (each uses a licence); None when unknown."""
    users = tenant.policy.directory.people if tenant.policy else []
    if group and tenant.policy:
        members = tenant.policy.directory.members.get(group.lower())
        return len(members) if members is not None else None
    return len(users) if tenant.policy and users else None


# --- renderings -----------------------------------------------------------------------------------


def ps_value(v: Any) -> str:
    """A PowerShell literal: $true/$false, numbers, 'quoted' strings, @('a','b') arrays."""
    if v is None:
        return "$null"
    if isinstance(v, bool):
        return "$true" if v else "$false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "@(" + ",".join(ps_value(x) for x in v) + ")"
    return "'" + str(v).replace("'", "''") + "'"


def prerequisite(plan: Plan) -> str:
    """What ``apply`` checks before it changes anything, and why (issue #13: the plan tells all)."""
    return (f"the certificate domain {plan.certificate_name} must be within an accepted (verified) domain of the "
            "tenant: Exchange Online attributes mail from the inbound connector to the tenant only when its "
            "TlsSenderCertificateName belongs to one of the tenant's accepted domains; otherwise the relayed mail "
            "is not recognised as the tenant's own. Add and verify it in the Microsoft 365 admin center → "
            "Settings → Domains (DNS verification), then apply.")


def to_powershell(plan: Plan) -> str:
    lines = ["# Exchange Online PowerShell (ExchangeOnlineManagement V3). Run: Connect-ExchangeOnline", "",
             f"# Prerequisite: {prerequisite(plan)}",
             f"# Check: Get-AcceptedDomain | Where-Object {{ '{plan.certificate_name}' -like \"*$($_.DomainName)\" }}",
             ""]
    for o in plan.objects:
        args = " ".join(f"-{k} {ps_value(v)}" for k, v in o.new_params().items())
        lines.append(f"New-{o.kind} {args}")
        if o.kind == "OutboundConnector":
            lines.append(f"Validate-OutboundConnector -Identity {ps_value(o.name)} "
                         "-Recipients @('validation@example.com')  # any external address")
            lines.append(f"Set-OutboundConnector -Identity {ps_value(o.name)} -IsValidated $true "
                         "-LastValidationTimestamp (Get-Date).ToUniversalTime() "
                         "-ValidationRecipients @('validation@example.com')")
    return "\n".join(lines) + "\n"


def to_json(plan: Plan) -> str:
    return json.dumps({
        "tenant": plan.tenant, "smart_host": plan.smart_host, "certificate_name": plan.certificate_name,
        "tls_domain": plan.tls_domain, "scope": plan.scope, "senders_in_scope": plan.senders_in_scope,
        "prerequisites": [prerequisite(plan)],
        "objects": [{"cmdlet": f"New-{o.kind}", "parameters": o.new_params()} for o in plan.objects],
        "notes": list(plan.notes),
    }, indent=2)


def to_text(plan: Plan) -> str:
    out = [f"Exchange Online setup for tenant {plan.tenant} (manual route, Exchange admin center → Mail flow)", "",
           f"0. Prerequisite: {prerequisite(plan)}", ""]
    for n, o in enumerate(plan.objects, 1):
        out.append(f"{n}. {o.kind}: {o.name}")
        out += [f"   - {g}" for g in o.gui]
        out.append("")
    scope = "all senders in the organization" if plan.scope == "all" else f"members of {plan.scope[6:]}"
    count = f"{plan.senders_in_scope} sender(s) in the directory" if plan.senders_in_scope is not None else \
        "unknown number of senders"
    out.append(f"Licences: the rule covers {scope} — {count}; every one of them uses a licence.")
    out += [f"Note: {n}" for n in plan.notes[1:]]
    return "\n".join(out) + "\n"
