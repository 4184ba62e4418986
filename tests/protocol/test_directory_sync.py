"""Issue #16: the directory from Microsoft Entra ID, synced from a local HTTPS emulator of the
Graph endpoints (tests/graph_emulator.py, in the shapes of Microsoft's Graph documentation)."""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import cli, config, policy
from tests.graph_emulator import GraphEmulator, GraphState
from tests.protocol.test_provisioning import APP_ID, app_pem
from tests.support import CONTOSO_ID, Deployment, make_deployment

TEMPLATE = ('<p>{{ user.displayName }} · {{ user.jobTitle }} · {{ user.extensionAttribute1 }}</p>'
            '{% if user.photo %}<img src="{{ user.photo }}" width="96" alt="">{% endif %}\n')
JPEG = b"\xff\xd8\xff\xe0" + b"photo-of-{}" + b"\xff\xd9"


def people(st: GraphState, n: int) -> None:
    for i in range(n):
        st.add_user(f"u{i:05d}", mail=f"user{i}@contoso.com", displayName=f"User {i}", jobTitle="Engineer",
                    department="R&D", businessPhones=["+1 425 555 0100"], userType="Member", accountEnabled=True,
                    proxyAddresses=[f"SMTP:user{i}@contoso.com", f"smtp:u{i}@contoso.onmicrosoft.com"],
                    onPremisesExtensionAttributes={"extensionAttribute1": f"cost-{i % 7}"},
                    streetAddress="1 Main St\nBuilding 2" if i == 0 else None)
    st.add_user("disabled", mail="gone@contoso.com", displayName="Gone", accountEnabled=False, userType="Member")
    st.add_user("nomail", displayName="No Mailbox", accountEnabled=True, userType="Member")
    st.add_user("guest", mail="partner@fabrikam.example", displayName="Guest Partner", userType="Guest",
                accountEnabled=True)
    st.add_group("g-emea", "Sales EMEA", ["user:u00003", "user:u00004"])
    st.add_group("g-sales", "Sales", ["user:u00001", "user:u00002", "group:g-emea", "user:nomail"],
                 mail="sales@contoso.com", groupTypes=["Unified"])
    st.add_group("g-sig", "Signature Users", ["group:g-sales", *(f"user:u{i:05d}" for i in range(10, 20))])
    for i in range(0, n, 10):
        st.photos[f"u{i:05d}"] = JPEG.replace(b"{}", str(i).encode())


@pytest.fixture
def env(tmp_path: Path, pki_dir: Path) -> Iterator[tuple[Deployment, GraphEmulator]]:
    dep = make_deployment(tmp_path, pki_from=pki_dir)
    cfg = dep.load()
    pem = tmp_path / "graph-app.pem"
    st = GraphState(CONTOSO_ID, APP_ID, app_pem(cfg, "signature-relay-graph", pem), page_size=100)
    people(st, 250)
    with GraphEmulator(st, cfg.tls.cert, cfg.tls.key) as emu:
        t = dep.root / "rules" / "contoso"
        (t / "tenant.toml").write_text((t / "tenant.toml").read_text() + (
            f'\n[directory]\nsource = "graph"\napp_id = "{APP_ID}"\ncertificate = "{pem}"\n'
            f'graph_url = "{st.base}"\nlogin_url = "{st.base}"\nca_bundle = "{cfg.certs.ca_cert}"\n'))
        (t / "rules.toml").write_text('[[rule]]\nname = "Sales"\nsenders = { groups = ["Sales"] }\nnew = "sig"\n'
                                      '[[rule]]\nname = "Everyone"\nnew = "sig"\n')
        sig = dep.root / "signatures" / "contoso"
        sig.mkdir(parents=True, exist_ok=True)
        (sig / "sig.html.j2").write_text(TEMPLATE)
        yield dep, emu


def sync(dep: Deployment, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    rc = cli.main(["directory", "sync", "-c", str(dep.config_path), "--no-reload", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def loaded(dep: Deployment) -> policy.Policy:
    cfg = policy.attach(config.load(str(dep.config_path)))
    p = cfg.tenant_by_name("contoso").policy  # type: ignore[union-attr]
    assert p is not None
    return p


def test_full_then_incremental_sync(env: tuple[Deployment, GraphEmulator], capsys: pytest.CaptureFixture[str]) -> None:
    dep, emu = env
    st = emu.state
    rc, out, err = sync(dep, capsys)
    assert rc == 0, err
    assert "full sync: 251 user(s), 3 group(s)" in out  # 250 + the guest; disabled and mailbox-less left out
    pages = [r for r in st.requests if "/users/delta" in r]
    assert len(pages) == 3 and "$skiptoken=100" in pages[1]  # paged by @odata.nextLink
    p = loaded(dep)
    d = p.directory
    u1 = d.user("user1@contoso.com")
    assert u1 and u1.get("extensionAttribute1") == "cost-1" and u1.get("businessPhones") == "+1 425 555 0100"
    assert d.user("u1@contoso.onmicrosoft.com") is u1  # proxyAddresses become aliases
    # a line break inside a value: one CSV row (quoted), one user, cleaned to a space when loaded
    assert d.user("user0@contoso.com").get("streetAddress") == "1 Main St Building 2"  # type: ignore[union-attr]
    assert d.user("gone@contoso.com") is None and d.user("partner@fabrikam.example") is not None
    assert d.user("partner@fabrikam.example").get("userType") == "Guest"  # type: ignore[union-attr]
    assert not p.rules.internal("partner@fabrikam.example")  # a guest is never internal
    # nested membership, resolved transitively as with the file source; M365 group kept as such
    assert d.members["signature users"] >= {"user1@contoso.com", "user3@contoso.com", "user15@contoso.com"}
    assert d.groups["sales"].microsoft365 and d.groups["sales"].mail == "sales@contoso.com"
    # photos: the users with one, embedded by the template as cid
    assert d.user("user0@contoso.com").photo_image is not None  # type: ignore[union-attr]
    assert d.user("user1@contoso.com").photo_image is None  # type: ignore[union-attr]
    photo_fetches = sum(r.endswith("/$value") for r in st.requests)
    assert photo_fetches == 25
    # incremental: 10 users change, one leaves, a member is added; one photo changes
    st.requests.clear()
    for i in range(100, 110):
        st.change_user(f"u{i:05d}", jobTitle="Manager")
    st.delete_user("u00200")
    st.add_member("g-emea", "user:u00005")
    st.photos["u00010"] = JPEG.replace(b"{}", b"new")
    rc, out, err = sync(dep, capsys)
    assert rc == 0, err
    assert "incremental sync: 250 user(s)" in out and "11 user and 1 group change(s) read" in out
    assert [r for r in st.requests if "/delta" in r] == [r for r in st.requests if "$deltatoken=" in r]
    assert sum(r.endswith("/$value") for r in st.requests) == 1  # only the changed photo (mediaEtag)
    d = loaded(dep).directory
    u = d.user("user105@contoso.com")
    # only jobTitle came in the delta: the other attributes are kept, not blanked
    assert u and u.get("jobTitle") == "Manager" and u.get("displayName") == "User 105" and u.get("department") == "R&D"
    assert d.user("user200@contoso.com") is None and "user5@contoso.com" in d.members["sales"]


def test_expired_delta_link_means_a_full_resync(env: tuple[Deployment, GraphEmulator],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    dep, emu = env
    assert sync(dep, capsys)[0] == 0
    for answer in ("expired", "410"):
        emu.state.inject = [answer]
        rc, out, err = sync(dep, capsys)
        assert rc == 0, err
        assert "delta link no longer valid" in out and "full sync: 251 user(s)" in out


def test_throttling_is_retried_and_401_403_are_explained(env: tuple[Deployment, GraphEmulator],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    dep, emu = env
    emu.state.inject = ["429", "503"]
    rc, out, _ = sync(dep, capsys)
    assert rc == 0 and "throttled (429), retrying" in out and "service unavailable (503), retrying" in out
    emu.state.inject = ["403"]
    rc, _, err = sync(dep, capsys, "--full")
    assert rc == 3 and "User.Read.All and GroupMember.Read.All" in err and "admin consent" in err
    emu.state.inject = ["401"]
    rc, _, err = sync(dep, capsys, "--full")
    assert rc == 3 and "refused the sign-in token (401" in err


def test_a_suspicious_or_failing_sync_keeps_the_current_snapshot(env: tuple[Deployment, GraphEmulator],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    dep, emu = env
    st = emu.state
    assert sync(dep, capsys)[0] == 0
    current = (dep.root / "var" / "directory" / "contoso" / "current").resolve()
    for i in range(0, 150):
        st.delete_user(f"u{i:05d}")
    rc, _, err = sync(dep, capsys)
    assert rc == 1 and "would drop the directory from 251 to 101 users" in err and "--force" in err
    assert (dep.root / "var" / "directory" / "contoso" / "current").resolve() == current
    assert loaded(dep).directory.user("user0@contoso.com") is not None  # the relay keeps serving the old one
    # a template that cannot render for a user: refused, old snapshot kept, the user named
    sig = dep.root / "signatures" / "contoso" / "sig.html.j2"
    sig.write_text("<p>{{ user.displayName }} {{ 100 // (user.jobTitle | length) }}</p>\n")
    st.change_user("u00160", jobTitle="")
    rc, _, err = sync(dep, capsys, "--force")
    assert rc == 1 and "does not pass the check" in err and "user160@contoso.com" in err
    assert (dep.root / "var" / "directory" / "contoso" / "current").resolve() == current
    sig.write_text(TEMPLATE)
    rc, out, err = sync(dep, capsys, "--force")
    assert rc == 0 and "101 user(s)" in out, err


def test_the_relay_stamps_from_the_snapshot_with_the_photo(env: tuple[Deployment, GraphEmulator],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    dep, _ = env
    assert sync(dep, capsys)[0] == 0
    for sender, photo in (("user10@contoso.com", True), ("user11@contoso.com", False)):
        msg = (f"From: <{sender}>\r\nTo: bob@example.net\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
               "Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>Hello</p></body></html>\r\n").encode()
        r = subprocess.run([sys.executable, "-m", "relay", "stamp", "-c", str(dep.config_path), "--from", sender,
                            "--to", "bob@example.net"], input=msg, capture_output=True, cwd=dep.root, timeout=60)
        assert r.returncode == 0, r.stderr
        m = email.message_from_bytes(r.stdout, policy=email.policy.default)
        html = next(p for p in m.walk() if p.get_content_type() == "text/html").get_content()
        assert b"stamped" in r.stderr and "Engineer" in html and "cost-" in html
        cids = [str(p["Content-ID"]) for p in m.walk() if p.get_content_maintype() == "image"]
        assert ('src="cid:photo-' in html) == photo and len(cids) == (1 if photo else 0)
        if photo:
            assert cids[0].strip("<>") in html


def test_sync_asks_the_running_relay_to_reload(env: tuple[Deployment, GraphEmulator],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    dep, _ = env
    got: list[int] = []
    old = signal.signal(signal.SIGHUP, lambda s, _f: got.append(s))
    try:
        var = dep.root / "var"
        var.mkdir(exist_ok=True)
        (var / "signature-relay.pid").write_text(f"{os.getpid()}\n")  # as `serve` writes it
        rc = cli.main(["directory", "sync", "-c", str(dep.config_path)])
        out = capsys.readouterr().out
        assert rc == 0 and f"asked the running relay (pid {os.getpid()}) to reload" in out and got == [signal.SIGHUP]
    finally:
        signal.signal(signal.SIGHUP, old)


def test_serve_schedules_syncs_and_links_photos(env: tuple[Deployment, GraphEmulator],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`serve` syncs a tenant whose sync_interval has passed (never more often, even after a
    failure); user.photoUrl links the photo under images_base_url."""
    import datetime as dt
    import time

    from relay.dircli import Scheduler
    from relay.dirsync import State
    from relay.rules import Message

    dep, _ = env
    t = dep.root / "rules" / "contoso" / "tenant.toml"
    t.write_text(t.read_text().replace("[directory]\n", "[directory]\nsync_interval = 3600\n", 1)
                 .replace("[tenant]\n", '[tenant]\nimages_base_url = "https://img.contoso.example"\n', 1))
    cfg = config.load(str(dep.config_path))
    s = Scheduler(cfg, lambda _m: None)
    assert [x.name for x in s.due()] == ["contoso"]  # never synced
    assert sync(dep, capsys)[0] == 0
    assert s.due() == []  # synced just now
    root = cfg.tenant_by_name("contoso").graph.root  # type: ignore[union-attr]
    st = State.load(root / "state.json")
    st.synced_at = time.time() - 3601
    st.save(root / "state.json")
    assert [x.name for x in s.due()] == ["contoso"]
    s.tried["contoso"] = time.time()  # a failed attempt just now: wait a whole interval again
    assert s.due() == []
    p = loaded(dep)
    ctx = p.context(Message(sender="user0@contoso.com", subject="x", body="", kind="new", at=dt.datetime.now(dt.UTC)),
                    ["bob@example.net"])
    assert ctx["user"]["photo"].startswith("cid:photo-")
    assert ctx["user"]["photoUrl"].startswith("https://img.contoso.example/photos/photo-")


def test_a_graph_tenant_must_be_synced_before_the_relay_starts(env: tuple[Deployment, GraphEmulator],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    dep, _ = env
    rc = cli.main(["check", "-c", str(dep.config_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "has not been synced yet" in err and "directory sync --tenant contoso" in err
    assert sync(dep, capsys)[0] == 0
    assert cli.main(["check", "-c", str(dep.config_path)]) == 0
    assert re.search(r"^OK: .*; serve runs on uvloop \S+$", capsys.readouterr().out, re.MULTILINE)
