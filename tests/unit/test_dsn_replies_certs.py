from __future__ import annotations

import datetime as dt
import email
import email.policy
import stat
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from relay import certs, config, replies
from relay.delivery import dsn
from relay.errors import PermanentError, Reply, TransientError
from tests.support import make_deployment, message


def test_dsn_is_a_valid_rfc3464_report() -> None:
    raw = message()
    out = dsn.build(
        original=raw, mail_from="alice@contoso.com",
        refused={"gone@example.net": dsn.Refusal(550, "5.1.1 User unknown", "mx.example.net")},
        reporting_mta="relay.test", queue_id="Q1", arrival=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        processed_header="X-CodeTwoProcessed",
    )
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied" and msg["X-CodeTwoProcessed"] == "true"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; gone@example.net" in status and "Status: 5.1.1" in status
    assert "Action: failed" in status
    assert b"Subject: Lunch" in out and b"see you tomorrow" not in out  # headers only, never the body
    assert not msg.defects and all(not p.defects for p in parts)


def test_never_a_dsn_for_a_null_sender() -> None:
    with pytest.raises(ValueError):
        dsn.build(original=b"", mail_from="", refused={}, reporting_mta="r", queue_id="Q",
                  arrival=dt.datetime.now(dt.UTC), processed_header="X")


def test_unexpected_errors_become_451_without_leaking() -> None:
    line = replies.reply_for(RuntimeError("/etc/secret path in traceback"))
    assert line.startswith("451 4.3.0") and "secret" not in line and "RuntimeError" not in line


def test_relay_errors_carry_their_reply() -> None:
    assert replies.reply_for(TransientError(replies.ENDPOINT_UNAVAILABLE, "x")).startswith("451 4.4.1")
    assert replies.reply_for(PermanentError(replies.NOT_AUTHORIZED, "x")).startswith("550 5.7.1")
    with pytest.raises(ValueError):
        TransientError(replies.NOT_AUTHORIZED)
    with pytest.raises(ValueError):
        Reply(451, "5.0.0", "class mismatch")


def test_reply_text_cannot_inject_a_second_line() -> None:
    assert "\r" not in str(Reply(550, "5.0.0", "bad\r\n250 OK")) and "\n" not in str(Reply(550, "5.0.0", "a\nb"))


@given(st.text(alphabet=st.characters(max_codepoint=300), max_size=40))
def test_a_reply_is_one_line_of_printable_ascii_whatever_its_text(text: str) -> None:
    line = str(Reply(250, "2.0.0", text))
    assert all(32 <= ord(ch) < 127 for ch in line)
    # every character outside printable ASCII became a space, nothing else changed
    want = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in text)
    assert line == f"250 2.0.0 {want}".replace("  ", " ").strip()


def test_certs_init_creates_keys_0600_refuses_overwrite_and_names(tmp_path: Path) -> None:
    d = make_deployment(tmp_path)  # generates a fresh PKI
    cfg = d.load()
    for _role, cert_path, key_path, names, _s, _c in certs.dev_pki_plan(cfg):
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert certs.names_of(cert) == list(names)
    server = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes())
    assert "*.smtp.signature-relay.test" in certs.names_of(server)
    with pytest.raises(certs.CertsError, match="refusing to overwrite"):
        certs.init_dev_pki(cfg)
    before = cfg.tls.cert.read_bytes()
    kept = certs.init_dev_pki(cfg, missing_only=True)
    assert not any(i.created for i in kept) and cfg.tls.cert.read_bytes() == before
    cfg.tls.cert.unlink()
    again = certs.init_dev_pki(cfg, missing_only=True)
    assert [i.role for i in again if i.created] == ["relay server"]
    assert certs.init_dev_pki(cfg, force=True)[0].created


def test_certs_missing_ca_with_leaves_is_an_error(tmp_path: Path, pki_dir: Path) -> None:
    cfg: config.Config = make_deployment(tmp_path, pki_from=pki_dir).load()
    cfg.certs.ca_cert.unlink()
    with pytest.raises(certs.CertsError, match="--force"):
        certs.init_dev_pki(cfg, missing_only=True)
