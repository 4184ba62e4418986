"""Apply, check and remove a :class:`~relay.provisioning.plan.Plan` through the admin API, with a
trace like the vendor wizard's. Idempotent: what already matches the plan is left alone."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.provisioning.api import AdminApi, ApiError
from relay.provisioning.plan import BRAND, Obj, Plan, optional_rule_names, ps_value

Log = Callable[[str], None]


@dataclass
class Change:
    obj: Obj
    action: str  # "create", "update", "ok"
    diffs: list[tuple[str, Any, Any]] = field(default_factory=list)  # (parameter, have, want)
    current: dict[str, Any] | None = None


# Exchange Online reads values back in its own formats (Get-* output, not what Set-* took):
# ByteQuantifiedSize "22.5 MB (23,592,960 bytes)", address spaces "smtp:*;1" (type:address;cost).
_BYTES = re.compile(r"^[\d.,]+\s*[KMGT]?B\s*\(([\d,]+)\s*bytes\)$", re.I)
_ADDRESS_SPACE = re.compile(r"^(?:smtp|x400|x500|ex):(.+?)(?:;\d+)?$", re.I)


def _norm(v: Any) -> Any:
    """A value as compared: semantically, so a tenant that matches the plan never shows drift."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int | float):
        return int(v)
    if isinstance(v, list | tuple):
        return sorted(str(_norm(x)) for x in v)
    s = str(v).strip()
    if s.isdigit():
        return int(s)
    m = _BYTES.match(s)
    if m:
        return int(m.group(1).replace(",", ""))
    m = _ADDRESS_SPACE.match(s)
    if m:
        return m.group(1).lower()
    return s.lower()


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, list | tuple) and isinstance(have, str):
        have = [have]  # a one-element collection read back as a plain string
    if isinstance(have, list | tuple) and len(have) == 1 and not isinstance(want, list | tuple):
        have = have[0]
    return bool(_norm(have) == _norm(want))


def _empty(v: Any) -> bool:
    """No value, as Exchange Online shows a cleared parameter (null, "", an empty collection)."""
    return v is None or v == "" or (isinstance(v, list | tuple) and not v)


def get(api: AdminApi, kind: str, name: str) -> dict[str, Any] | None:
    try:
        res = api.invoke(f"Get-{kind}", {"Identity": name})
    except ApiError as e:
        if "couldn't be found" in str(e) or "ManagementObjectNotFound" in str(e):
            return None
        raise
    return res.value[0] if res.value else None


def compare(obj: Obj, have: dict[str, Any] | None) -> Change:
    if have is None:
        return Change(obj, "create")
    diffs = [(k, have.get(k), want) for k, want in obj.params.items() if not _same(have.get(k), want)]
    diffs += [(k, have.get(k), None) for k in obj.absent if not _empty(have.get(k))]
    if obj.kind == "TransportRule" and str(have.get("State", "Enabled")).lower() != "enabled":
        # A disabled rule stops stamping for the whole tenant, and Set-TransportRule cannot
        # change it: Enable-TransportRule does (learn.microsoft.com/powershell/module/exchange/enable-transportrule).
        diffs.append(("State", have.get("State"), "Enabled"))
    return Change(obj, "update" if diffs else "ok", diffs, have)


def _fix_line(c: Change, k: str, have: Any, want: Any) -> str:
    if k == "State":
        return f"Enable-TransportRule -Identity {ps_value(c.obj.name)}"
    return _set_line(Change(c.obj, "update", [(k, have, want)]))


def diff(api: AdminApi, plan: Plan) -> list[Change]:
    return [compare(o, get(api, o.kind, o.name)) for o in plan.objects]


def _set_line(c: Change) -> str:
    args = " ".join(f"-{k} {ps_value(want)}" for k, _, want in c.diffs)
    return f"Set-{c.obj.kind} -Identity {ps_value(c.obj.name)} {args}"


def check_accepted_domain(api: AdminApi, plan: Plan) -> str | None:
    """The inbound connector's certificate domain must be a (verified) accepted domain."""
    domains = [str(d.get("DomainName", d.get("Name", ""))).lower() for d in api.invoke("Get-AcceptedDomain").value]
    cert = plan.certificate_name.lower()
    if any(cert == d or cert.endswith("." + d) for d in domains):
        return None
    return (f"the certificate domain {plan.certificate_name} is not within an accepted domain of the tenant "
            f"(have: {', '.join(domains) or 'none'}). Add and verify it in the Microsoft 365 admin center → "
            "Settings → Domains, then run apply again.")


def apply(api: AdminApi, plan: Plan, *, log: Log, dry_run: bool = False,
          validation_recipient: str = "validation@example.com") -> list[Change]:
    log(f"Tenant {plan.tenant}: {'dry run, nothing will be changed' if dry_run else 'configuring Exchange Online'}")
    log("[1/5] Checking the certificate domain is an accepted domain")
    problem = check_accepted_domain(api, plan)
    if problem:
        raise ApiError(f"Cannot continue: {problem}", exit_code=1)
    log("      ok")
    changes: list[Change] = []
    steps = {"InboundConnector": "[2/5] Inbound connector", "OutboundConnector": "[3/5] Outbound connector"}
    for obj in plan.objects:
        label = steps.get(obj.kind, "[5/5] Transport rule")
        c = compare(obj, get(api, obj.kind, obj.name))
        changes.append(c)
        _apply_one(api, obj, c, label, log, dry_run)
        if obj.kind == "OutboundConnector":
            _validate(api, plan, obj, c, log, dry_run, validation_recipient)
    changed = sum(c.action != "ok" for c in changes)
    log(f"Done: {changed} object(s) {'would change' if dry_run else 'created or updated'}, "
        f"{len(changes) - changed} already as planned.")
    if changed and not dry_run:
        log("Note: changes can take from a few minutes to more than an hour to propagate in Exchange Online; "
            "signatures are not added until they do.")
    return changes


def _apply_one(api: AdminApi, obj: Any, c: Change, label: str, log: Log, dry_run: bool) -> None:
    """Create or correct one planned object (or only say what would happen, in a dry run)."""
    if c.action == "ok":
        log(f"{label} '{obj.name}': already as planned")
    elif c.action == "create":
        log(f"{label} '{obj.name}': {'would create' if dry_run else 'creating'}")
        if not dry_run:
            res = api.invoke(f"New-{obj.kind}", obj.new_params())
            for w in res.warnings:
                log(f"      warning from Exchange Online: {w}")
    else:
        for k, have, want in c.diffs:
            log(f"{label} '{obj.name}': {k}: {have!r} → {want!r}" + (" (would change)" if dry_run else ""))
        if not dry_run:
            settable = {k: w for k, _, w in c.diffs if k != "State"}
            if settable:
                api.invoke(f"Set-{obj.kind}", {"Identity": obj.name, **settable})
            if any(k == "State" for k, _, _ in c.diffs):
                api.invoke("Enable-TransportRule", {"Identity": obj.name})


def _validate(api: AdminApi, plan: Plan, obj: Any, c: Change, log: Log, dry_run: bool, recipient: str) -> None:
    """Validate the outbound connector when it changed or was never validated."""
    if c.action == "ok" and (c.current or {}).get("IsValidated"):
        log(f"[4/5] '{obj.name}' is validated")
        return
    log(f"[4/5] Validating '{obj.name}' (Exchange Online sends a test message to the relay)"
        + (" — skipped in dry run" if dry_run else ""))
    if dry_run:
        return
    res = api.invoke("Validate-OutboundConnector", {"Identity": obj.name, "Recipients": [recipient]})
    failed = _validation_failures(res.value, log)
    if failed:
        # A flag left from an earlier validation would make `check` vouch for settings that failed now.
        api.invoke("Set-OutboundConnector", {"Identity": obj.name, "IsValidated": False})
        raise ApiError(
            f"Validation of '{obj.name}' failed: {'; '.join(failed)}. The connector is NOT marked validated. "
            f"Check that the relay is reachable from the internet on port 25 as {plan.smart_host} and presents a "
            f"certificate for {plan.tls_domain} (signature-relay check), then run apply again or validate it in the "
            f"Exchange admin center → Mail flow → Connectors → '{obj.name}' → Validate this connector.", exit_code=1)
    # Validate-OutboundConnector does not set the flag: mark it validated ourselves.
    api.invoke("Set-OutboundConnector", {
        "Identity": obj.name, "IsValidated": True,
        "LastValidationTimestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ValidationRecipients": [recipient]})


def _validation_failures(results: list[dict[str, Any]], log: Log) -> list[str]:
    """Validate-OutboundConnector answers one result per task (``TaskName``, ``IsTaskSuccessful``,
    details). Each is traced; a task not reported successful, or no result at all, is a failure:
    an answer we cannot read must never mark the connector validated."""
    if not results:
        return ["Exchange Online returned no validation result"]
    failed = []
    for r in results:
        name = str(r.get("TaskName") or "validation")
        ok = r.get("IsTaskSuccessful")
        if ok is None and "Status" in r:  # older shape, seen in some scripts
            ok = str(r["Status"]).lower() == "succeeded"
        detail = r.get("Details") or r.get("Detail") or r.get("Error") or ""
        log(f"      {name}: {'ok' if ok is True else 'FAILED'}{f' ({detail})' if detail and ok is not True else ''}")
        if ok is not True:
            failed.append(f"{name}{f': {detail}' if detail else ''}")
    return failed


def check(api: AdminApi, plan: Plan, apply_cmd: str = "signature-relay connectors apply") -> list[str]:
    """Every setting that differs from the plan, each with the command that fixes it."""
    problems = []
    domain = check_accepted_domain(api, plan)
    if domain:
        problems.append(domain)
    for c in diff(api, plan):
        if c.action == "create":
            problems.append(f"{c.obj.kind} '{c.obj.name}' is missing. Fix: {apply_cmd}")
        elif c.action == "update":
            for k, have, want in c.diffs:
                problems.append(f"{c.obj.kind} '{c.obj.name}': {k} is {have!r}, should be {want!r}. "
                                f"Fix: {_fix_line(c, k, have, want)}")
        if c.obj.kind == "OutboundConnector" and c.current is not None and not c.current.get("IsValidated"):
            problems.append(f"OutboundConnector '{c.obj.name}' is not validated. Fix: {apply_cmd}")
    return problems


def remove(api: AdminApi, plan: Plan, *, log: Log, brand: str = BRAND) -> int:
    """Rule(s) first, then outbound, then inbound: never a rule pointing at a missing connector.
    The optional exception rules are removed whenever they exist, whatever flags built ``plan``."""
    planned = [(r.kind, r.name) for r in reversed(plan.rules)]
    extra = [("TransportRule", n) for n in optional_rule_names(brand) if n not in {r for _, r in planned}]
    order = [*planned, *extra, (plan.outbound.kind, plan.outbound.name), (plan.inbound.kind, plan.inbound.name)]
    removed = 0
    for kind, name in order:
        if get(api, kind, name) is None:
            if (kind, name) not in extra:
                log(f"{kind} '{name}': not present")
            continue
        api.invoke(f"Remove-{kind}", {"Identity": name, "Confirm": False})
        log(f"{kind} '{name}': removed")
        removed += 1
    return removed
