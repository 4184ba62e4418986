"""End-to-end tier: the real CLI processes, real swaks over STARTTLS, real openssl s_client.

`signature-relay serve` and `signature-relay sink` run as separate processes on a throw-away
deployment, exactly as an admin runs them; nothing is imported from the relay in-process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.mime import headers
from tests.support import Deployment, make_deployment, wait_port

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "relay"]
MESSAGE = (b"From: Alice <alice@contoso.com>\r\nTo: <bob@example.net>\r\nSubject: e2e caf\xc3\xa9\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           b"Hello Bob,\r\n.a line starting with a dot\r\n\r\nCaf\xc3\xa9 \xe2\x98\x95\r\n")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:  # `make test` installs these; a missing tool is a failure, never a skip
        pytest.fail(f"{tool} not installed: run `make test` (it installs swaks and openssl from Debian)")
    return path


class Procs:
    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, port: int) -> None:
        p = subprocess.Popen([*CLI, *args, "-c", str(self.dep.config_path)], cwd=self.dep.root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs[name] = p
        wait_port(port, p)

    def stop(self, name: str) -> str:
        p = self.procs.pop(name)
        p.send_signal(signal.SIGTERM)
        try:
            _, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        return err.decode()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture
def loop(tmp_path: Path, pki_dir: Path) -> Iterator[Procs]:
    dep = make_deployment(tmp_path, pki_from=pki_dir)
    procs = Procs(dep)
    procs.start("sink", "sink", port=dep.sink_port)
    procs.start("relay", "serve", "--no-sink", port=dep.relay_port)
    yield procs
    procs.stop_all()


def swaks(dep: Deployment, *args: str, data: bytes = MESSAGE) -> tuple[int, str]:
    f = dep.root / "msg.eml"
    f.write_bytes(data)
    r = subprocess.run(
        [need("swaks"), "--server", f"127.0.0.1:{dep.relay_port}", "--helo", "mail-x.outbound.protection.outlook.com",
         "--data", f"@{f}", "--timeout", "30", *args],
        capture_output=True, timeout=60)
    return r.returncode, r.stdout.decode("utf-8", "replace") + r.stderr.decode("utf-8", "replace")


def sent_data(transcript: str) -> bytes:
    """What swaks put on the wire after DATA, un-dot-stuffed (RFC 5321 §4.5.2)."""
    lines = transcript.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(r"^ ~> DATA$", ln))
    out = []
    for ln in lines[start + 1:]:
        if not ln.startswith(" ~> "):
            continue  # the server's 354 and other replies
        body = ln[4:]
        if body == ".":
            break
        out.append(body[1:] if body.startswith("..") else body)
    return ("\n".join(out) + "\n").replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def test_swaks_starttls_loop_delivers_marked_message_unchanged(loop: Procs) -> None:
    dep = loop.dep
    rc, out = swaks(dep, "--tls", "--tls-verify", "--tls-ca-path", str(dep.root / "certs" / "ca.crt"),
                    "--from", "alice@contoso.com", "--to", "bob@example.net")
    assert rc == 0, out
    assert re.search(r"<~  250 2\.0\.0 Ok \S+ accepted by tenant endpoint", out), out
    [got] = dep.delivered()
    assert headers.get_all(got, "X-CodeTwoProcessed") == ["true"]
    sent = sent_data(out)
    assert sent.startswith(MESSAGE)  # swaks adds its own final CRLF before "."
    assert got.endswith(sent)  # every byte swaks sent, unchanged, after our two added fields
    body = got[headers.header_end(got):]
    assert body == sent[headers.header_end(sent):]
    log = loop.stop("relay")
    assert re.search(r"message qid=\S+ .*tenant=contoso .*decision=marked", log), log
    # serve's default loop ([service] event_loop = "auto"): uvloop, a dependency
    assert re.search(r"ready: .*, event loop uvloop \S+$", log, re.MULTILINE), log


def test_swaks_without_tls_gets_530(loop: Procs) -> None:
    rc, out = swaks(loop.dep, "--from", "alice@contoso.com", "--to", "bob@example.net")
    assert rc != 0 and "530 Must issue a STARTTLS command first" in out, out
    assert loop.dep.delivered() == []


def test_unknown_tenant_gets_550_5_7_1(loop: Procs) -> None:
    rc, out = swaks(loop.dep, "--tls", "--from", "mallory@evil.example", "--to", "bob@example.net")
    assert rc != 0 and "550 5.7.1" in out, out
    assert not re.search(r"<~  250 (2\.\d\.\d )?OK\s*$", out.split("MAIL FROM")[1], re.M)  # no 250 after MAIL
    assert loop.dep.delivered() == []


def test_sink_stopped_gives_4xx_and_nothing_delivered(loop: Procs) -> None:
    loop.stop("sink")
    rc, out = swaks(loop.dep, "--tls", "--from", "alice@contoso.com", "--to", "bob@example.net")
    assert rc != 0 and re.search(r"<~\*\s+451 4\.4\.1 ", out), out
    assert loop.dep.delivered() == []
    log = loop.stop("relay")
    assert "accepted by tenant endpoint" not in log and "reply=\"451 4.4.1" in log, log


def openssl(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("openssl"), "s_client", "-connect", f"127.0.0.1:{dep.relay_port}", "-starttls", "smtp",
         "-CAfile", str(dep.root / "certs" / "ca.crt"), *args],
        input="QUIT\n", capture_output=True, text=True, timeout=30)


def test_openssl_tls_versions_and_presented_certificate(loop: Procs) -> None:
    dep = loop.dep
    ok = openssl(dep, "-tls1_2", "-showcerts")
    assert "Protocol  : TLSv1.2" in ok.stdout or "Protocol: TLSv1.2" in ok.stdout, ok.stdout + ok.stderr
    assert "Verify return code: 0 (ok)" in ok.stdout
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", ok.stdout, re.S)
    assert pem
    sans = subprocess.run([need("openssl"), "x509", "-noout", "-ext", "subjectAltName"], input=pem.group(),
                          capture_output=True, text=True, check=True).stdout
    for name in ("DNS:smtp.signature-relay.test", "DNS:*.smtp.signature-relay.test", "DNS:*.signature-relay.test"):
        assert name in sans, sans
    # The client is made willing to speak TLS 1.1 (SECLEVEL=0), so only the server can refuse it.
    old = openssl(dep, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert old.returncode != 0
    assert "no protocols available" not in old.stderr  # i.e. the refusal did not come from our client
    # OpenSSL reports the server's refusal as a protocol alert or, when the server just closes the
    # handshake, as an unexpected EOF; either way no certificate was ever presented.
    assert re.search(r"alert protocol version|unsupported protocol|wrong version|unexpected eof",
                     old.stderr + old.stdout, re.I), old.stderr
    assert "no peer certificate available" in old.stdout


def test_embedded_default_from_a_checkout(tmp_path: Path) -> None:
    """What `make serve` does, minus the long-running part: certs from nothing, then a valid config."""
    repo = Path(__file__).resolve().parents[2]
    shutil.copytree(repo / "rules", tmp_path / "rules")
    shutil.copytree(repo / "signatures", tmp_path / "signatures")
    env = {**os.environ}
    env.pop("SIGNATURE_RELAY_CONFIG", None)
    r = subprocess.run([*CLI, "certs", "init", "--missing-only"], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "created tenant contoso client" in r.stdout and "sha256:" in r.stdout and "expires:" in r.stdout
    assert (tmp_path / "certs" / "tenants" / "contoso.key").stat().st_mode & 0o777 == 0o600
    again = subprocess.run([*CLI, "certs", "init"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    check = subprocess.run([*CLI, "check"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert check.returncode == 0 and "tenant contoso" in check.stdout, check.stderr


def test_config_error_stops_startup_naming_file_and_key(tmp_path: Path, pki_dir: Path) -> None:
    dep = make_deployment(tmp_path, pki_from=pki_dir)
    dep.config_path.write_text(dep.config_path.read_text().replace("[listen]", "[listen]\nmax_mesage_size = 5"))
    r = subprocess.run([*CLI, "serve", "-c", str(dep.config_path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert f"configuration error: {dep.config_path}: listen.max_mesage_size: unknown key" in r.stderr


GMAIL_REPLY = (
    b"From: Alice Wilber <alice@contoso.com>\r\nTo: Bob <bob@fabrikam.example>\r\nSubject: Re: Lunch\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"000000000000a1b2c3\"\r\n\r\n"
    b"--000000000000a1b2c3\r\nContent-Type: text/plain; charset=\"UTF-8\"\r\n\r\nYes please!\r\n\r\n"
    b"On Fri, Jan 3, 2025 at 4:01 PM Bob <bob@fabrikam.example> wrote:\r\n\r\n> Lunch on Friday?\r\n\r\n"
    b"--000000000000a1b2c3\r\nContent-Type: text/html; charset=\"UTF-8\"\r\n\r\n"
    b'<div dir="ltr">Yes please!</div><br><div class="gmail_quote"><div class="gmail_attr">On Fri, Jan 3, 2025 '
    b"Bob wrote:</div><blockquote>Lunch on Friday?</blockquote></div>\r\n\r\n--000000000000a1b2c3--\r\n")


@pytest.fixture
def stamping_loop(tmp_path: Path, pki_dir: Path) -> Iterator[Procs]:
    dep = make_deployment(tmp_path, pki_from=pki_dir, signature=True)
    procs = Procs(dep)
    procs.start("sink", "sink", port=dep.sink_port)
    procs.start("relay", "serve", "--no-sink", port=dep.relay_port)
    yield procs
    procs.stop_all()


def test_swaks_reply_is_stamped_under_the_newest_reply(stamping_loop: Procs) -> None:
    import email
    import email.policy

    dep = stamping_loop.dep
    rc, out = swaks(dep, "--tls", "--from", "alice@contoso.com", "--to", "bob@fabrikam.example", data=GMAIL_REPLY)
    assert rc == 0, out
    [got] = dep.delivered()
    assert headers.get_all(got, "X-CodeTwoProcessed") == ["true"]
    msg = email.message_from_bytes(got, policy=email.policy.default)
    plain = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    # text: newest reply, then the signature, then the quoted history
    assert plain.index("Yes please!") < plain.index("Alice Wilber · Sales Director") < plain.index("On Fri, Jan 3")
    assert plain.count("Alice Wilber · Sales Director") == 1
    assert html.index("Yes please!") < html.index("<b>Alice Wilber</b>") < html.index('class="gmail_quote"')
    assert html.count("<b>Alice Wilber</b>") == 1
    log = stamping_loop.stop("relay")
    assert re.search(r"decision=stamped rules=signature:Everyone placement=\"html:gmail text:attribution\"", log), log


def test_stamp_cli_as_a_process(tmp_path: Path, pki_dir: Path) -> None:
    dep = make_deployment(tmp_path, pki_from=pki_dir, signature=True)
    r = subprocess.run([*CLI, "stamp", "-c", str(dep.config_path), "--from", "alice@contoso.com"],
                       input=GMAIL_REPLY, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert b"decision: stamped\nplacement: html:gmail text:attribution\nsignature: tenant contoso" in r.stderr
    assert r.stdout.startswith(b"X-CodeTwoProcessed: true\r\n") and b"Alice Wilber" in r.stdout


def test_exchange_online_connector_validation_message(tmp_path: Path, pki_dir: Path) -> None:
    """What Exchange Online sends when an admin clicks Validate on the outbound connector: accepted
    with 250, relayed as a pass-through (marked, never stamped), even with stamping rules in place."""
    dep = make_deployment(tmp_path, pki_from=pki_dir, signature=True, sender_domain_binding=False)
    procs = Procs(dep)
    procs.start("sink", "sink", port=dep.sink_port)
    procs.start("relay", "serve", "--no-sink", port=dep.relay_port)
    try:
        validation = (b"From: O365ConnectorValidation@contoso.onmicrosoft.com\r\nTo: validation@example.com\r\n"
                      b"Subject: Test email for connector validation\r\n"
                      b"X-MS-Exchange-CrossTenant-Id: 3f6e1b2a-9c4d-4e8f-a1b2-5c7d9e0f1a2b\r\n"
                      b"X-MS-Exchange-CrossTenant-AuthAs: Internal\r\nMIME-Version: 1.0\r\n"
                      b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
                      b"This is a test message for connector validation.\r\n")
        rc, out = swaks(dep, "--tls", "--from", "<>", "--to", "validation@example.com", data=validation)
        assert rc == 0, out
        assert re.search(r"<~  250 2\.0\.0 Ok \S+ accepted by tenant endpoint", out), out
        [got] = dep.delivered()
        assert got.endswith(sent_data(out)) and b"signature-relay" not in got.split(b"\r\n\r\n", 1)[1]
        log = procs.stop("relay")
        assert "decision=pass-through(connector-validation)" in log, log
    finally:
        procs.stop_all()


def test_sighup_reloads_rules_without_a_restart(stamping_loop: Procs) -> None:
    dep = stamping_loop.dep
    (dep.root / "signatures" / "contoso" / "v2.html.j2").write_text("<p>VERSION TWO</p>\n")
    (dep.root / "rules" / "contoso" / "rules.toml").write_text('[[rule]]\nname = "V2"\nnew = "v2"\n')
    relay = stamping_loop.procs["relay"]
    relay.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert relay.poll() is None  # still running
    rc, out = swaks(dep, "--tls", "--from", "alice@contoso.com", "--to", "bob@fabrikam.example", data=GMAIL_REPLY)
    assert rc == 0, out
    [got] = dep.delivered()
    assert b"VERSION TWO" in got, got[-600:]
    assert b"<b>Alice Wilber</b>" not in got  # the old rules' signature (literal even in QP)
    log = stamping_loop.stop("relay")
    assert "configuration reloaded" in log and "rules=signature:V2" in log, log


def test_queue_mode_survives_kill_9(tmp_path: Path, pki_dir: Path) -> None:
    """Queue mode: after a 250 the message is on disk. kill -9 the relay, bring the endpoint up,
    start the relay again: the message arrives, once."""
    dep = make_deployment(tmp_path, pki_from=pki_dir)
    dep.config_path.write_text(dep.config_path.read_text().replace(
        "[delivery]\n", '[delivery]\nmode = "queue"\nretry_min = 0.2\nretry_max = 0.5\n'))
    procs = Procs(dep)
    procs.start("relay", "serve", "--no-sink", port=dep.relay_port)
    try:
        rc, out = swaks(dep, "--tls", "--from", "alice@contoso.com", "--to", "bob@example.net")
        assert rc == 0 and re.search(r"<~  250 2\.0\.0 Ok \S+ queued", out), out
        relay = procs.procs.pop("relay")
        relay.kill()  # SIGKILL: no shutdown code runs
        relay.wait(timeout=10)
        assert dep.delivered() == []
        procs.start("sink", "sink", port=dep.sink_port)
        procs.start("relay", "serve", "--no-sink", port=dep.relay_port)
        deadline = time.monotonic() + 20
        while not dep.delivered() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        assert len(dep.delivered()) == 1
        assert not list((dep.root / "var" / "spool").glob("*.json"))
    finally:
        procs.stop_all()


def test_json_log_lines_parse_and_carry_no_body_text(tmp_path: Path, pki_dir: Path) -> None:
    """Issue #15 (logs, in part): `--log-format json` gives one JSON object per stderr line; the
    per-message line has its fields as keys; no body text ever appears."""
    import json

    dep = make_deployment(tmp_path, pki_from=pki_dir)
    procs = Procs(dep)
    procs.start("sink", "sink", port=dep.sink_port)
    procs.start("relay", "serve", "--no-sink", "--log-format", "json", port=dep.relay_port)
    try:
        body = b"Hello Bob,\r\nSECRET-BODY-MARKER caf\xc3\xa9\r\n"
        raw = (b"From: Alice <alice@contoso.com>\r\nTo: <bob@example.net>\r\nSubject: json log test\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body)
        rc, out = swaks(dep, "--tls", "--from", "alice@contoso.com", "--to", "bob@example.net", data=raw)
        assert rc == 0, out
    finally:
        err = procs.stop("relay")
        procs.stop_all()
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    assert any("ready" in str(r.get("msg", "")) for r in lines)
    [msg] = [r for r in lines if r.get("event") == "message"]
    assert msg["from"] == "<alice@contoso.com>" and msg["reply"].startswith("250 ") and msg["tenant"] == "contoso"
    assert all(k in msg for k in ("ts", "level", "qid", "decision", "latency_ms"))
    assert "SECRET-BODY-MARKER" not in err


def test_privacy_mode_hashes_every_address(tmp_path: Path, pki_dir: Path) -> None:
    """Issue #15 (logs, in part): with --log-privacy no address appears in the log; each becomes the
    same keyed token wherever it occurs, so lines still correlate."""
    import json
    import os

    from relay.log import Privacy

    key = "k" * 24
    dep = make_deployment(tmp_path, pki_from=pki_dir)
    procs = Procs(dep)
    procs.start("sink", "sink", "--reject-rcpt", "gone@", port=dep.sink_port)
    os.environ["SIGNATURE_RELAY_LOG_KEY"] = key
    try:
        procs.start("relay", "serve", "--no-sink", "--log-format", "json", "--log-privacy", port=dep.relay_port)
    finally:
        del os.environ["SIGNATURE_RELAY_LOG_KEY"]
    try:
        rc, out = swaks(dep, "--tls", "--from", "alice@contoso.com", "--to", "gone@example.net,bob@example.net")
        assert rc == 0, out
    finally:
        err = procs.stop("relay")
        procs.stop_all()
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    [msg] = [r for r in lines if r.get("event") == "message"]
    p = Privacy(key.encode())
    assert msg["from"] == f"<{p.token('alice@contoso.com')}>" and msg["refused"] == p.token("gone@example.net")
    for address in ("alice@contoso.com", "gone@example.net", "bob@example.net", "@contoso.com"):
        assert address not in err


def test_privacy_mode_without_a_key_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from relay import cli

    monkeypatch.delenv("SIGNATURE_RELAY_LOG_KEY", raising=False)
    assert cli.main(["check", "--log-privacy"]) == 2


def test_implicit_tls_listener_serves_on_asyncio_loop_and_relays(tmp_path: Path, pki_dir: Path) -> None:
    """serve with an implicit-TLS listener and the default event_loop ("auto"): its start-up line
    says asyncio (uvloop would hand the ClientHello to the admission gate, relay.eventloop), and
    swaks over implicit TLS (--tlsc) gets the message through."""
    from tests.support import free_port

    dep = make_deployment(tmp_path, pki_from=pki_dir)
    port = free_port()
    dep.config_path.write_text(dep.config_path.read_text().replace(
        "idle_timeout = 30", f'idle_timeout = 30\nimplicit_tls = ["127.0.0.1:{port}"]'))
    procs = Procs(dep)
    try:
        procs.start("sink", "sink", port=dep.sink_port)
        procs.start("relay", "serve", "--no-sink", port=port)
        r = subprocess.run(
            [need("swaks"), "--server", f"127.0.0.1:{port}", "--tlsc", "--tls-verify", "--tls-ca-path",
             str(dep.root / "certs" / "ca.crt"), "--helo", "mail-x.outbound.protection.outlook.com",
             "--from", "alice@contoso.com", "--to", "bob@example.net", "--timeout", "30"],
            capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        [got] = dep.delivered()
        assert headers.get_all(got, "X-CodeTwoProcessed") == ["true"]
        log = procs.stop("relay")
        assert re.search(r"ready: .*, event loop asyncio$", log, re.MULTILINE), log
    finally:
        procs.stop_all()
