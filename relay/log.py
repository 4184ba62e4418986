"""Logging setup and the one log line every message gets (logfmt: key=value, greppable)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping


def setup(level: str = "info") -> None:
    logging.basicConfig(
        stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # aiosmtpd logs every command line at INFO; that is per-line noise in a hot loop.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def _quote(v: object) -> str:
    s = str(v)
    s = "".join(c if c.isprintable() else "?" for c in s)
    if not s or any(c in s for c in ' ="'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def fmt(fields: Mapping[str, object]) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)
