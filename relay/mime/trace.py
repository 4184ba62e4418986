"""Trace fields we write: ``Received:`` (RFC 5321 §4.4) and the processed marker.

Anything from the client (HELO name, addresses) is sanitised before it goes into a header:
a CR or LF there would let a client inject header fields of its own.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import functools
import re
from collections.abc import Sequence
from typing import Final

_HELO_SAFE: Final = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")
_ADDR_SAFE: Final = re.compile(r"[^\x21-\x7e]")
_TLS_SAFE: Final = re.compile(r"[^A-Za-z0-9._\-= /]")


def _clean(value: str, pattern: re.Pattern[str], limit: int) -> str:
    return pattern.sub("?", value)[:limit] or "unknown"


def received(
    *, helo: str | None, peer_ip: str | None, by: str, queue_id: str, recipients: Sequence[str],
    tls: str | None, smtputf8: bool, when: dt.datetime,
) -> bytes:
    """Build our ``Received:`` field, folded below 78 columns (RFC 5322 §2.1.1).

    ``with`` uses the RFC 3848 / RFC 6531 protocol types: ESMTPS after STARTTLS, UTF8SMTPS when
    SMTPUTF8 was used. ``for`` is only given for a single recipient (RFC 5321 §4.4 warns that
    it discloses Bcc recipients otherwise).
    """
    proto = ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if tls else "")
    lines = [f"Received: from {_clean(helo or 'unknown', _HELO_SAFE, 255)} ([{peer_ip or 'unknown'}])"]
    if tls:
        lines.append(f"\t({_clean(tls, _TLS_SAFE, 200)})")
    lines.append(f"\tby {by} (signature-relay) with {proto} id {queue_id}")
    if len(recipients) == 1:
        lines.append(f"\tfor <{_clean(recipients[0], _ADDR_SAFE, 320)}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{_date(when)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def _date(when: dt.datetime) -> str:
    """RFC 5322 §3.3 date-time of ``when`` (email.utils.format_datetime, about 5 µs), the same
    string for every message in that second. The key holds the offset: equal instants in other
    zones compare equal, and must not share a string."""
    return _second(when.replace(microsecond=0), when.utcoffset())


@functools.lru_cache(maxsize=8)
def _second(when: dt.datetime, _offset: dt.timedelta | None) -> str:
    return email.utils.format_datetime(when)


def marker(header_name: str) -> bytes:
    return f"{header_name}: true\r\n".encode("ascii")
