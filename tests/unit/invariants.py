"""Properties every stamping result must have, checked on the golden corpus and on generated
messages alike."""

from __future__ import annotations

import email
import email.policy

from relay.mime import codec, scanner
from relay.mime.classify import find_targets
from relay.mime.stamper import StampResult

MARKER = b"X-CodeTwoProcessed: true"


def _defects(raw: bytes | bytearray) -> set[str]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    out = {type(d).__name__ for d in msg.defects}
    for p in msg.walk():
        out |= {type(d).__name__ for d in p.defects}
    return out


def check(raw: bytes | bytearray, result: StampResult, sig_html_probe: str, sig_text_probe: str) -> None:
    out = result.data
    if result.decision.action == "pass-through" and result.decision.reason == "already-processed":
        assert out == raw
        return
    eol = b"\n" if raw.find(b"\n") > 0 and raw[raw.find(b"\n") - 1:raw.find(b"\n")] != b"\r" else b"\r\n"
    assert out.startswith(MARKER + eol)
    body = out[len(MARKER + eol):]
    if result.decision.action != "stamped":
        assert body == raw  # pass-through: byte-identical after the marker
        return
    before, after = scanner.scan(raw), scanner.scan(body)
    assert not after.defects
    assert len(before.parts) == len(after.parts)
    targets = {p.index for p in find_targets(before).values()}
    for b, a in zip(before.parts, after.parts, strict=True):
        assert (b.ctype, b.children) == (a.ctype, a.children)
        if b.index in targets:
            data = codec.decode_text(codec.decode_transfer(after.body_bytes(a), a.cte), a.charset)
            probe = sig_html_probe if a.ctype == "text/html" else sig_text_probe
            assert data.count(probe) == 1, f"signature must appear exactly once in part {a.index}"
            assert all(len(line.rstrip(b"\r")) <= 998 for line in after.body_bytes(a).split(b"\n"))
        elif b.maintype != "multipart" or not any(t in _descendants(before, b.index) for t in targets):
            # untouched part: header and body byte-identical
            assert before.header_bytes(b) == after.header_bytes(a)
            assert before.body_bytes(b) == after.body_bytes(a)
        else:
            # a container of an edited leaf: its own header and preamble are unchanged
            assert before.header_bytes(b) == after.header_bytes(a)
    new_defects = _defects(body) - _defects(raw)
    assert not new_defects, new_defects


def _descendants(s: scanner.Scan, index: int) -> set[int]:
    return {p.index for p in s.walk(index)} - {index}
