"""Shared test support: a throw-away deployment (config, tenants, real dev PKI) on free ports."""

from __future__ import annotations

import socket
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from relay import certs, config, policy

CONTOSO_ID = "3f6e1b2a-9c4d-4e8f-a1b2-5c7d9e0f1a2b"
FABRIKAM_ID = "0b8d2c4e-6f1a-4b3c-9d5e-7a8b9c0d1e2f"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Deployment:
    root: Path
    config_path: Path
    relay_port: int
    sink_port: int

    def load(self) -> config.Config:
        return policy.attach(config.load(self.config_path))

    @property
    def maildir(self) -> Path:
        return self.root / "var" / "sink" / "Maildir"

    def delivered(self) -> list[bytes]:
        new = self.maildir / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]


def tenant_toml(name: str, tid: str, domains: list[str], endpoint: str, subdomain: str) -> str:
    doms = ", ".join(f'"{d}"' for d in domains)
    return textwrap.dedent(f"""\
        [tenant]
        id = "{tid}"
        initial_domain = "{name}.onmicrosoft.com"
        accepted_domains = [{doms}]
        subdomain = "{subdomain}"

        [inbound]
        endpoint = "{endpoint}"
        """)


SIG_HTML = '<p style="margin:0"><b>Alice Wilber</b> · Sales Director · Contoso Ltd.</p>\n'
SIG_TEXT = "Alice Wilber · Sales Director · Contoso Ltd.\n"


def make_deployment(root: Path, *, sender_domain_binding: bool = True, extra: str = "",
                    contoso_endpoint: str | None = None, pki_from: Path | None = None,
                    signature: bool = False) -> Deployment:
    """Write a complete deployment under ``root``: relay + sink config, two tenants, dev PKI.

    ``pki_from`` copies certificates generated once per session (RSA keygen is the slow part).
    """
    relay_port, sink_port = free_port(), free_port()
    (root / "rules" / "contoso").mkdir(parents=True, exist_ok=True)
    (root / "rules" / "fabrikam").mkdir(parents=True, exist_ok=True)
    (root / "rules" / "contoso" / "tenant.toml").write_text(tenant_toml(
        "contoso", CONTOSO_ID, ["contoso.com"], contoso_endpoint or f"127.0.0.1:{sink_port}", "contoso-7q4k2m"))
    (root / "rules" / "fabrikam" / "tenant.toml").write_text(tenant_toml(
        "fabrikam", FABRIKAM_ID, ["fabrikam.com"], f"127.0.0.1:{sink_port}", "fabrikam-2b9x1k"))
    if signature:
        (root / "signatures" / "contoso").mkdir(parents=True, exist_ok=True)
        (root / "signatures" / "contoso" / "plain.html.j2").write_text(SIG_HTML)
        (root / "signatures" / "contoso" / "plain.txt.j2").write_text(SIG_TEXT)
        (root / "rules" / "contoso" / "rules.toml").write_text(
            '[[rule]]\nname = "Everyone"\nnew = "plain"\n')
    cfg_path = root / "relay.toml"
    cfg_path.write_text(textwrap.dedent(f"""\
        [service]
        hostname = "smtp.signature-relay.test"
        service_domain = "signature-relay.test"

        [listen]
        smtp = ["127.0.0.1:{relay_port}"]
        idle_timeout = 30

        [tls]
        cert = "certs/server.crt"
        key = "certs/server.key"

        [binding]
        sender_domain = {"true" if sender_domain_binding else "false"}

        [security]
        allowed_networks = ["127.0.0.0/8", "::1/128"]

        [delivery]
        ca_bundle = "certs/ca.crt"
        connect_timeout = 5
        command_timeout = 10
        data_timeout = 20

        [sink]
        enabled = true
        listen = "127.0.0.1:{sink_port}"
        """) + extra)
    if pki_from is not None:
        import shutil
        shutil.copytree(pki_from, root / "certs", dirs_exist_ok=True)
    else:
        certs.init_dev_pki(config.load(cfg_path))
    return Deployment(root, cfg_path, relay_port, sink_port)


def message(*, frm: str = "alice@contoso.com", to: str = "bob@example.net", extra_headers: str = "",
            body: str = "Hello Bob,\r\n\r\nsee you tomorrow.\r\n") -> bytes:
    return (f"From: Alice <{frm}>\r\nTo: <{to}>\r\nSubject: Lunch\r\n"
            f"Message-ID: <test.{free_port()}@contoso.com>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n{extra_headers}\r\n{body}").encode()


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    """Until ``proc`` listens on ``port`` (127.0.0.1); fails at once if ``proc`` exits first.
    ``proc`` None: a daemon we did not start as a child (a private Postfix, a container)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited early: {proc.stderr.read().decode() if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError(f"port {port} never opened")
