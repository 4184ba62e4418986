"""Issue #11: `stamp` and `preview` give byte-identical output to what the relay delivers for the
same message, envelope and configuration (one flow: relay.pipeline.accept → run)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from relay import cli
from tests.protocol.conftest import Stack
from tests.protocol.test_security import session, transaction
from tests.support import Deployment

CONFIG_EXTRA = 'processed_header = "X-Sig-Done"\n'
RAW = (b"From: Alice <alice@contoso.com>\nTo: <bob@example.net>\nSubject: RE: plan\nMIME-Version: 1.0\n"
       b"Content-Type: multipart/alternative; boundary=b1\n\n"
       b"--b1\nContent-Type: text/plain; charset=utf-8\n\nYes, Thursday works.\n\n"
       b"On Mon, 6 Jan 2025 at 09:12, Bob <bob@example.net> wrote:\n> Thursday?\n"
       b"--b1\nContent-Type: text/html; charset=utf-8\n\n<html><body><p>Yes, Thursday works.</p>"
       b'<div class="gmail_quote">On Mon, Bob wrote:<blockquote>Thursday?</blockquote></div></body></html>\n'
       b"--b1--\n")  # bare LF on purpose: every path must normalise it the same way


def without_trace(data: bytes) -> bytes:
    """Drop our Received: field (queue id and time differ per run); everything else must match."""
    assert data.startswith(b"Received: ")
    end = data.index(b"\r\n")
    while data[end + 2:end + 3] in (b" ", b"\t"):
        end = data.index(b"\r\n", end + 2)
    return data[end + 2:]


async def test_stamp_preview_and_relay_deliver_the_same_bytes(make_stack: object, deployment: Deployment,
                                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    sig = deployment.root / "signatures" / "contoso"
    sig.mkdir(parents=True, exist_ok=True)
    (sig / "t.html.j2").write_text("<p>{{ user.mail }} · Sales</p>\n")
    (sig / "t.txt.j2").write_text("{{ user.mail }} · Sales\n")
    (deployment.root / "rules" / "contoso" / "rules.toml").write_text('[[rule]]\nname = "All"\nreply = "t"\n'
                                                                      'new = "t"\n')
    text = deployment.config_path.read_text()
    deployment.config_path.write_text(text.replace('service_domain = "signature-relay.test"\n',
                                                   'service_domain = "signature-relay.test"\n' + CONFIG_EXTRA))
    st: Stack = await make_stack()  # type: ignore[operator]
    assert st.cfg.processed_header == "X-Sig-Done"
    c = await session(st)
    assert (await transaction(c, b"<alice@contoso.com>", [b"<bob@example.net>"], RAW))[-1].startswith("250")
    c.close()
    [delivered] = st.deployment.delivered()
    relay_out = without_trace(delivered)
    assert relay_out.startswith(b"X-Sig-Done: true\r\n") and b"alice@contoso.com =C2=B7 Sales" in relay_out

    # The DATA terminator's CRLF is part of the message the relay got; feed the CLI the same bytes.
    sent = RAW + b"\r\n"

    class Stdin:
        buffer = io.BytesIO(sent)

    monkeypatch.setattr(sys, "stdin", Stdin())
    out = io.BytesIO()

    class Stdout:
        buffer = out

    monkeypatch.setattr(sys, "stdout", Stdout())
    assert cli.main(["stamp", "--config", str(deployment.config_path), "--from", "alice@contoso.com",
                     "--to", "bob@example.net"]) == 0
    monkeypatch.undo()
    assert out.getvalue() == relay_out

    eml = tmp_path / "in.eml"
    eml.write_bytes(sent)
    assert cli.main(["preview", "--config", str(deployment.config_path), "--from", "alice@contoso.com",
                     "--to", "bob@example.net", "--eml", str(eml), "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert (tmp_path / "p" / "preview-1.eml").read_bytes() == relay_out


def test_stamp_without_from_takes_each_messages_from_address(deployment: Deployment, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`stamp --report ~/mail-samples/` (the README's command) replays an admin's own mail: without
    --from the envelope sender is each file's From: address, not the null sender (which made every
    file a null-sender pass-through)."""
    eml = tmp_path / "reply.eml"
    eml.write_bytes(RAW.replace(b"\n", b"\r\n"))
    cfg = ["--config", str(deployment.config_path), "--to", "bob@example.net"]
    assert cli.main(["stamp", *cfg, "--report", str(eml)]) == 0
    default = capsys.readouterr().out
    assert cli.main(["stamp", *cfg, "--from", "alice@contoso.com", "--report", str(eml)]) == 0
    assert default == capsys.readouterr().out and not default.startswith("pass-through(null-sender)")
    assert cli.main(["stamp", *cfg, "--from", "", "--report", str(eml)]) == 0
    assert capsys.readouterr().out.startswith("pass-through(null-sender)\t")
    stranger = tmp_path / "stranger.eml"
    stranger.write_bytes(RAW.replace(b"alice@contoso.com", b"eve@unknown.example").replace(b"\n", b"\r\n"))
    assert cli.main(["stamp", *cfg, "--report", str(stranger)]) == 0  # one refused file does not stop a replay
    assert capsys.readouterr().out.startswith("refused(550 5.7.1)\t")  # no tenant serves it, as the relay answers
