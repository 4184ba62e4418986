"""Logging setup and the one log line every message gets (logfmt: key=value, greppable).

Every log line is escaped: peers choose envelope addresses, HELO names, header values and the
text of downstream replies, and a CR, LF or ANSI escape in any of them could forge log lines or
rewrite an operator's terminal (issue #10, finding 7). :class:`SafeFormatter` does it in one place
for every logger of the relay, whatever the call site passes; :func:`safe` is the same escaping
for values built into other strings.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any


def safe(value: object) -> str:
    """``value`` as text with every non-printable character escaped (``\\r``, ``\\x1b``...)."""
    s = str(value)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] if c in "\r\n\t" else f"\\x{ord(c):02x}"
                   if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in s)


class SafeFormatter(logging.Formatter):
    """Escapes the message part of every record (the traceback of ``exc_info`` stays multi-line:
    it is ours, not the peer's)."""

    privacy: Privacy | None = None

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = safe(record.message)
        if self.privacy is not None:
            record.message = self.privacy.scrub(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        return self.privacy.scrub(text) if self.privacy is not None else text  # exception texts name addresses too


# Anything shaped like an address (local@domain), also inside <…> and in Message-IDs.
_ADDRESS = re.compile(r"[^\s<>\"'(),;:\[\]]+@[^\s<>\"'(),;:\[\]]+")


class Privacy:
    """Privacy mode: every address in every log line becomes a keyed hash (HMAC-SHA256, 12 hex
    digits) — the same address gives the same token, so lines still correlate, but the log does
    not reveal who wrote to whom without the key."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def token(self, address: str) -> str:
        return "h:" + hmac.new(self.key, address.lower().encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:12]

    def scrub(self, text: str) -> str:
        return _ADDRESS.sub(lambda m: self.token(m.group(0)), text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``--log-format json``). The per-message line carries its fields
    as keys (``"event": "message"``), so a log pipeline needs no logfmt parser. JSON escaping
    covers CR/LF/ESC, and message bodies are never logged in any format."""

    privacy: Privacy | None = None

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out["event"] = "message"
            out.update({k: v for k, v in fields.items() if v is not None})
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if self.privacy is not None:
            out = {k: self.privacy.scrub(v) if isinstance(v, str) else v for k, v in out.items()}
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str = "info", fmt: str = "text", privacy_key: bytes | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: JsonFormatter | SafeFormatter
    if fmt == "json":
        formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = SafeFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    formatter.privacy = Privacy(privacy_key) if privacy_key else None
    handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    # aiosmtpd logs every command line at INFO; that is per-line noise in a hot loop.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def _quote(v: object) -> str:
    s = safe(v)
    if not s or any(c in s for c in ' ="'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def fmt(fields: Mapping[str, object]) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)
