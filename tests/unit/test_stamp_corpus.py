"""Replay public real-world corpora: never crash, never lose a byte, explain every pass-through."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import cli, ingress
from relay.errors import PermanentError
from relay.mime.stamper import Signature, stamp
from tests.unit import invariants

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
FILES = sorted(CORPUS.rglob("*.eml"))
SIG = Signature(html="<p>Alice Wilber · Sales — ☎</p>", text="Alice Wilber · Sales — ☎")


def test_corpus_present() -> None:
    assert len(FILES) >= 180


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_world_message(path: Path) -> None:
    raw = path.read_bytes()
    r = stamp(raw, SIG, mail_from="alice@contoso.com")
    if r.decision.action == "pass-through":
        assert r.decision.reason  # every pass-through says why
    invariants.check(raw, r, "Alice Wilber · Sales", "Alice Wilber · Sales")
    assert stamp(r.data, SIG).data == r.data
    # As the relay sees it: after ingress every line ends in CRLF, and stamping keeps it so.
    try:
        wire = ingress.accept(raw, ingress.IngressLimits(max_header_bytes=10**7, max_header_fields=10**6)).raw
    except PermanentError as e:
        assert str(e.reply).startswith("554 5.6.0")  # a NUL in the header (a UTF-16 file): refused, not relayed
        return
    out = stamp(wire, SIG, mail_from="alice@contoso.com").data
    assert b"\n" not in out.replace(b"\r\n", b"") and b"\r" not in out.replace(b"\r\n", b"")
    if max(map(len, wire.split(b"\r\n"))) <= 998:
        assert max(map(len, out.split(b"\r\n"))) <= 998  # no over-long line unless the input had one


def test_report_cli_summarises_the_corpus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    html, text = tmp_path / "s.html", tmp_path / "s.txt"
    html.write_text(SIG.html)
    text.write_text(SIG.text)
    rc = cli.main(["stamp", "--html", str(html), "--text", str(text), "--from", "alice@contoso.com",
                   "--report", str(CORPUS)])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if "\t" in ln]
    assert len(lines) == len(FILES)
    for ln in lines:
        decision = ln.split("\t")[0]
        assert decision == "stamped" or decision.startswith(("marked(", "refused(554 5.6.0")) or (
            decision.startswith("pass-through(") and decision.endswith(")"))
    assert f"{len(FILES)} file(s): " in out and "stamped" in out and "placements:" in out
