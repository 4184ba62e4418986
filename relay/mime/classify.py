"""Decide *stamp* or *pass through (reason)*. Pure; the reason is part of the result.

Pass-through beats breakage (DESIGN): a signed, encrypted, rights-protected, calendar, report,
auto-submitted or malformed message is relayed unchanged (still marked processed), because
editing it would break a signature, a meeting, or a machine-read report.
"""

from __future__ import annotations

import re
from typing import Final

from relay.mime import headers
from relay.mime.scanner import Part, Scan

PGP_ARMOUR: Final = re.compile(rb"-----BEGIN PGP (?:MESSAGE|SIGNED MESSAGE)-----")
_VALIDATION_FROM: Final = re.compile(r"o365connectorvalidation@", re.I)


def classify(scan: Scan, *, mail_from: str | None, top: dict[str, list[str]] | None = None) -> str | None:
    """The pass-through reason for this message, or None when it should be stamped.
    ``top`` is :func:`headers.index` of the message when the caller already has it."""
    top = headers.index(scan.raw) if top is None else top
    subject = (top.get("subject") or [""])[0]
    from_ = (top.get("from") or [""])[0]
    # Exchange Online's "Validate connector" probe: accept and relay untouched (issue #6).
    if _VALIDATION_FROM.search(from_) or subject.strip().lower() == "test email for connector validation":
        return "connector-validation"
    if mail_from == "":
        return "null-sender"  # NDRs, DSNs and other system mail (RFC 5321 §4.5.5)
    auto_m = re.match(r"\s*([A-Za-z0-9-]+)", (top.get("auto-submitted") or ["no"])[0])
    auto = auto_m.group(1).lower() if auto_m else "no"  # the keyword, without comments/parameters
    if auto != "no":
        return f"auto-submitted:{auto}"  # RFC 3834: out-of-office and other automatic replies
    content_class = " ".join(top.get("content-class", ())).lower()
    if "recall" in content_class:
        return "message-recall"
    if "calendarmessage" in content_class:
        return "calendar"
    if scan.defects:
        return f"malformed:{scan.defects[0]}"
    for p in scan.walk():
        reason = _part_reason(p)
        if reason:
            return reason
    return None


def _part_reason(p: Part) -> str | None:
    ct = p.ctype
    if ct == "multipart/signed":
        return "signed"
    if ct in ("multipart/encrypted",):
        return "encrypted"
    if ct in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        st = p.params.get("smime-type", "").lower()
        return "signed" if st == "signed-data" else "encrypted"
    if ct == "multipart/report" or ct in ("message/delivery-status", "message/disposition-notification"):
        return "report"
    if ct == "application/x-microsoft-rpmsg-message" or (p.filename or "").lower().endswith(".rpmsg"):
        return "rights-protected"
    if ct == "application/ms-tnef" or (p.filename or "").lower() == "winmail.dat":
        return "tnef"
    if ct == "text/calendar" and not p.is_attachment:
        return "calendar"  # a meeting request/response; stamping it breaks the invitation
    return None


def find_targets(scan: Scan) -> dict[str, Part]:
    """The message's own body leaves: the first inline text/plain and text/html that are not
    attachments. Interleaved bodies (iOS: text, image, text in one multipart/mixed) use the
    last text leaf of that run, so the signature ends the composed text."""
    found: dict[str, list[Part]] = {"plain": [], "html": []}
    for p in scan.walk():
        if p.maintype == "text" and p.ctype[5:] in found and not p.is_attachment:
            found[p.ctype[5:]].append(p)
    out: dict[str, Part] = {}
    for sub, leaves in found.items():
        if not leaves:
            continue
        first = leaves[0]
        run = [q for q in leaves if q.parent == first.parent and first.parent is not None]
        parent = scan.parts[first.parent] if first.parent is not None else None
        if parent is not None and parent.ctype == "multipart/mixed" and len(run) > 1:
            out[sub] = run[-1]
        else:
            out[sub] = first
    return out
