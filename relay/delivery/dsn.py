"""Delivery status notifications (RFC 3464) for recipients the tenant endpoint refused for good.

Built as bytes, pure. Sent from the null sender (RFC 5321 §4.5.5) so it can never bounce back,
and never sent for a message that itself had a null sender (that is how bounce loops start).
"""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from relay.mime import headers


@dataclass(frozen=True)
class Refusal:
    code: int
    text: str
    remote: str  # the endpoint that said it


def _status(code: int, text: str) -> str:
    """The enhanced status from the reply text when there is one (RFC 3463), else generic."""
    first = text.split(" ", 1)[0]
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] == str(code)[0]:
        return first
    return f"{str(code)[0]}.0.0"


def _ascii(s: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in s)


def build(
    *, original: bytes | bytearray, mail_from: str, refused: Mapping[str, Refusal], reporting_mta: str,
    queue_id: str, arrival: dt.datetime, processed_header: str, delivered: Sequence[str] = (),
) -> bytes:
    """The DSN message for ``refused`` recipients of ``original`` (sent by ``mail_from``).
    ``delivered`` names who did get it, so the text never claims a delivery that did not happen."""
    if not mail_from:
        raise ValueError("never send a DSN for a null-sender message")
    boundary = f"=_dsn_{queue_id}"
    now = email.utils.format_datetime(dt.datetime.now(dt.UTC))
    human = [
        "This is the mail system at " + _ascii(reporting_mta) + ".",
        "",
        "Your message could not be delivered to one or more recipients.",
        (f"It was delivered to {len(delivered)} other recipient(s)." if delivered else
         "It was not delivered to any recipient."),
        "The receiving server said:",
        "",
    ] + [f"<{_ascii(r)}>: {f.code} {_ascii(f.text)}" for r, f in refused.items()]
    status = [
        f"Reporting-MTA: dns; {_ascii(reporting_mta)}",
        f"X-Queue-ID: {queue_id}",
        f"Arrival-Date: {email.utils.format_datetime(arrival)}",
    ]
    for rcpt, f in refused.items():
        status += [
            "",
            f"Final-Recipient: rfc822; {_ascii(rcpt)}",
            "Action: failed",
            f"Status: {_status(f.code, f.text)}",
            f"Remote-MTA: dns; {_ascii(f.remote)}",
            f"Diagnostic-Code: smtp; {f.code} {_ascii(f.text)}",
        ]
    orig_headers = original[: headers.header_end(original)].rstrip(b"\r\n")
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        # A non-ASCII sender is reached only with SMTPUTF8, where UTF-8 headers are allowed (RFC 6532 §3.2).
        f"To: <{mail_from}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {now}",
        f"Message-ID: <{queue_id}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834: never auto-answer this
        f"{processed_header}: true",  # keep the transport rule from routing it back to us
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        *status,
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    return head + orig_headers.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + (
        f"\r\n\r\n--{boundary}--\r\n".encode("ascii"))
