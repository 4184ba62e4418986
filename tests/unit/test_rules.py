"""Rules, directory and templates (issue #4), on a small tenant built per test."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path

import pytest

from relay import directory, policy, rules
from relay.mime.stamper import Signature
from relay.policy import Policy, PolicyError, message_of
from relay.rules import Message

UTC = dt.UTC
DIRECTORY = """\
mail,displayName,jobTitle,department,mobilePhone,proxyAddresses,extensionAttribute1
alice@contoso.com,Alice Wilber,Sales Director,Sales,+1 555 0101,smtp:alice.w@contoso.com,
bob@contoso.com,Bob Kelly,Support Engineer,Support,,,
carol@contoso.com,Carol Dubois,Account Manager,Sales,,,
dave@contoso.com,Dave Chen,CEO,Management,,,
emily@contoso.com,Emily Braun,Assistant,Management,,,
info@contoso.com,Contoso Info,,,,,shared
"""
GROUPS = """\
[[group]]
name = "Sales"
members = ["alice@contoso.com", "group:EMEA"]

[[group]]
name = "EMEA"
members = ["carol@contoso.com"]

[[group]]
name = "Everyone"
hidden = true
members = ["group:Sales", "bob@contoso.com", "dave@contoso.com", "emily@contoso.com"]
"""
TEMPLATES = {
    "sig.html.j2": ("<p><b>{{ user.displayName }}</b></p>\n<p>{{ user.jobTitle }}</p>\n"
                    "<p>M {{ user.mobilePhone }}</p>\n"),
    "short.html.j2": "<p>{{ user.displayName }}</p>\n",
    "banner.html.j2": "<p>BANNER</p>\n",
    "legal.html.j2": "<p>LEGAL</p>\n",
    "legal.txt.j2": "LEGAL TEXT\n",
}


def tenant(tmp: Path, rules_toml: str, templates: dict[str, str] | None = None, directory_csv: str = DIRECTORY,
           groups: str = GROUPS) -> Policy:
    tdir, sdir = tmp / "rules" / "contoso", tmp / "signatures" / "contoso"
    tdir.mkdir(parents=True, exist_ok=True)
    sdir.mkdir(parents=True, exist_ok=True)
    (tdir / "directory.csv").write_text(directory_csv)
    (tdir / "groups.toml").write_text(groups)
    (tdir / "rules.toml").write_text(textwrap.dedent(rules_toml))
    for name, src in (TEMPLATES if templates is None else templates).items():
        (sdir / name).write_text(src)
    (sdir / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return Policy.load("contoso", tdir, sdir, frozenset({"contoso.com", "contoso.onmicrosoft.com"}),
                  "https://img.contoso.com")


def msg(sender: str = "alice@contoso.com", subject: str = "Hello", body: str = "", kind: str = "new",
        at: dt.datetime | None = None) -> Message:
    return Message(sender, subject, body, kind, at or dt.datetime(2026, 6, 1, 12, tzinfo=UTC))


def names(p: Policy, m: Message, rcpt: str) -> list[str]:
    return [f"{s.section}:{s.rule}" for s in p.rules.outcome(p.directory, m, rcpt)]


# --- conditions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("senders", "matching", "not_matching"), [
    ('{ users = ["bob@contoso.com"] }', "bob@contoso.com", "alice@contoso.com"),
    ('{ groups = ["Sales"] }', "carol@contoso.com", "bob@contoso.com"),  # carol via nested EMEA
    ('{ domains = ["contoso.com"] }', "dave@contoso.com", "x@fabrikam.example"),
    ('{ where = [{ attribute = "department", equals = "support" }] }', "bob@contoso.com", "alice@contoso.com"),
    ('{ where = [{ attribute = "jobTitle", matches = "(?i)director|ceo" }] }', "dave@contoso.com", "bob@contoso.com"),
    ('{ where = [{ attribute = "mobilePhone", not_empty = true }] }', "alice@contoso.com", "bob@contoso.com"),
    ('{ all = true, except_users = ["bob@contoso.com"] }', "alice@contoso.com", "bob@contoso.com"),
    ('{ groups = ["Sales"], except_groups = ["EMEA"] }', "alice@contoso.com", "carol@contoso.com"),
    ('{ all = true, except_domains = ["fabrikam.example"] }', "alice@contoso.com", "x@fabrikam.example"),
    ('{ all = true, except_where = [{ attribute = "extensionAttribute1", equals = "shared" }] }',
     "alice@contoso.com", "info@contoso.com"),
])
def test_sender_conditions(tmp_path: Path, senders: str, matching: str, not_matching: str) -> None:
    p = tenant(tmp_path, f'[[rule]]\nname = "R"\nsenders = {senders}\nnew = "sig"\n')
    assert names(p, msg(matching), "x@example.net") == ["signature:R"]
    assert names(p, msg(not_matching), "x@example.net") == []


@pytest.mark.parametrize(("recipients", "matching", "not_matching"), [
    ('{ scope = "external" }', "x@example.net", "bob@contoso.com"),
    ('{ scope = "internal" }', "bob@contoso.onmicrosoft.com", "x@example.net"),
    ('{ users = ["vip@example.net"] }', "VIP@example.net", "x@example.net"),
    ('{ groups = ["Sales"] }', "alice.w@contoso.com", "bob@contoso.com"),  # alias resolves to alice
    ('{ domains = ["fabrikam.example"] }', "a@fabrikam.example", "a@example.net"),
    ('{ scope = "external", except_domains = ["fabrikam.example"] }', "a@example.net", "a@fabrikam.example"),
    ('{ all = true, except_users = ["no@example.net"] }', "yes@example.net", "no@example.net"),
])
def test_recipient_conditions(tmp_path: Path, recipients: str, matching: str, not_matching: str) -> None:
    p = tenant(tmp_path, f'[[rule]]\nname = "R"\nrecipients = {recipients}\nnew = "sig"\n')
    assert names(p, msg(), matching.lower()) == ["signature:R"]
    assert names(p, msg(), not_matching.lower()) == []


def test_contact_with_external_address_is_not_internal(tmp_path: Path) -> None:
    """Internal means an accepted domain of the tenant: a directory contact elsewhere is external."""
    csv = DIRECTORY + "partner@example.net,Partner Contact,,,,,\n"
    p = tenant(tmp_path, '[[rule]]\nname = "R"\nrecipients = { scope = "internal" }\nnew = "sig"\n',
               directory_csv=csv)
    assert names(p, msg(), "partner@example.net") == []


def test_keywords_trigger_and_suppress(tmp_path: Path) -> None:
    p = tenant(tmp_path, """
        [[rule]]
        name = "Legal"
        section = "disclaimer"
        keywords = { trigger = ["contract"], suppress = ["[nosig]"] }
        new = "legal"
    """)
    assert names(p, msg(subject="The CONTRACT"), "x@example.net") == ["disclaimer:Legal"]
    assert names(p, msg(body="see the contract attached"), "x@example.net") == ["disclaimer:Legal"]
    assert names(p, msg(subject="contract [nosig]"), "x@example.net") == []
    assert names(p, msg(subject="hello"), "x@example.net") == []


def test_message_kind_new_reply_none(tmp_path: Path) -> None:
    p = tenant(tmp_path, '[[rule]]\nname = "R"\nnew = "sig"\nreply = "short"\n[[rule]]\nname = "B"\n'
               'section = "banner"\nnew = "banner"\nreply = "none"\n')
    assert [s.template for s in p.rules.outcome(p.directory, msg(kind="new"), "x@e.net")] == ["sig"]
    assert [s.template for s in p.rules.outcome(p.directory, msg(kind="reply"), "x@e.net")] == ["short"]
    # "R" stops by default, so B is never reached
    p2 = tenant(tmp_path / "2", '[[rule]]\nname = "B"\nsection = "banner"\nnew = "banner"\nreply = "none"\n'
                'stop = false\n[[rule]]\nname = "R"\nnew = "sig"\n')
    assert names(p2, msg(kind="new"), "x@e.net") == ["signature:R", "banner:B"]
    assert names(p2, msg(kind="reply"), "x@e.net") == ["signature:R"]


def test_reply_detection() -> None:
    for s in ("RE: x", "Re[2]: x", "AW: x", "FW: x", "Fwd: x", "WG: x", "TR: x", "RV: x", "SV: x", "ODP: x"):
        assert rules.is_reply(s, False), s
    assert not rules.is_reply("Rebate offer", False)
    assert rules.is_reply("Quarterly numbers", True)  # In-Reply-To/References


def test_ordering_stop_continue_and_stacking(tmp_path: Path) -> None:
    p = tenant(tmp_path, """
        [[rule]]
        name = "Disclaimer"
        section = "disclaimer"
        new = "legal"
        stop = false

        [[rule]]
        name = "Banner"
        section = "banner"
        new = "banner"
        stop = false

        [[rule]]
        name = "Sales"
        senders = { groups = ["Sales"] }
        new = "sig"
        stop = true

        [[rule]]
        name = "Default"
        new = "short"

        [[rule]]
        name = "Never"
        section = "banner"
        new = "banner"
    """)
    # fixed stacking order whatever the rule order: signature, banner, disclaimer
    assert names(p, msg("alice@contoso.com"), "x@e.net") == ["signature:Sales", "banner:Banner",
                                                            "disclaimer:Disclaimer"]
    assert names(p, msg("bob@contoso.com"), "x@e.net") == ["signature:Default", "banner:Banner",
                                                          "disclaimer:Disclaimer"]
    sig, _ = p.render(p.rules.outcome(p.directory, msg(), "x@e.net"), msg(), ["x@e.net"])
    assert sig is not None
    html = sig.html
    assert html.index("Alice Wilber") < html.index("BANNER") < html.index("LEGAL")
    assert sig.text.index("Alice Wilber") < sig.text.index("LEGAL TEXT")


def test_disabled_rule_and_internal_flag(tmp_path: Path) -> None:
    p = tenant(tmp_path, '[[rule]]\nname = "Off"\nenabled = false\nnew = "banner"\n'
               '[[rule]]\nname = "R"\ninternal = false\nnew = "sig"\n')
    assert names(p, msg(), "x@example.net") == ["signature:R"]
    assert names(p, msg(), "bob@contoso.com") == []


# --- time windows, time zones, DST -------------------------------------------------------------------


def test_time_window_is_zone_aware_start_inclusive_end_exclusive(tmp_path: Path) -> None:
    p = tenant(tmp_path, """
        [[rule]]
        name = "Promo"
        window = { start = 2026-03-29T02:30:00, end = 2026-10-25T02:30:00, tz = "Europe/Berlin" }
        new = "sig"
    """)
    berlin = dt.timezone(dt.timedelta(hours=2))  # CEST
    # 2026-03-29 02:30 does not exist in Berlin (clocks jump 02:00 -> 03:00): zoneinfo maps it to
    # 03:30 CEST (fold=0 uses the offset before the transition, i.e. +01:00 → 01:30 UTC)
    assert names(p, msg(at=dt.datetime(2026, 3, 29, 1, 29, tzinfo=UTC)), "x@e.net") == []
    assert names(p, msg(at=dt.datetime(2026, 3, 29, 1, 30, tzinfo=UTC)), "x@e.net") == ["signature:Promo"]
    assert names(p, msg(at=dt.datetime(2026, 7, 1, 12, tzinfo=berlin)), "x@e.net") == ["signature:Promo"]
    # the end 02:30 on 25 October is ambiguous (clocks go back 03:00 -> 02:00): fold=0 is the first
    # one, CEST (+02:00) = 00:30 UTC; exclusive
    assert names(p, msg(at=dt.datetime(2026, 10, 25, 0, 29, tzinfo=UTC)), "x@e.net") == ["signature:Promo"]
    assert names(p, msg(at=dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC)), "x@e.net") == []


# --- directory ------------------------------------------------------------------------------------


def test_nested_groups_aliases_and_cycles(tmp_path: Path) -> None:
    p = tenant(tmp_path, '[[rule]]\nname = "R"\nnew = "sig"\n')
    d = p.directory
    assert d.members["sales"] == {"alice@contoso.com", "carol@contoso.com"}
    assert d.members["everyone"] >= {"carol@contoso.com", "bob@contoso.com"}
    u = d.user("ALICE.W@contoso.com")
    assert u is not None and u.mail == "alice@contoso.com" and "sales" in u.groups
    cyc = GROUPS + '\n[[group]]\nname = "A"\nmembers = ["group:B"]\n[[group]]\nname = "B"\nmembers = ["group:A"]\n'
    with pytest.raises(PolicyError, match="membership cycle"):
        tenant(tmp_path / "c", '[[rule]]\nname = "R"\nnew = "sig"\n', groups=cyc)


def test_directory_values_are_cleaned_of_control_characters(tmp_path: Path) -> None:
    csv = DIRECTORY.replace("Alice Wilber", '"Alice\r\nBcc: evil@x\x00"')
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "directory.csv").write_text(csv)
    u = directory.load(tmp_path / "d").user("alice@contoso.com")
    assert u is not None and u.get("displayName") == "Alice Bcc: evil@x"


# --- Send As / on behalf ----------------------------------------------------------------------------


def test_send_as_uses_the_mailbox_and_send_on_behalf_the_delegate() -> None:
    send_as = b"From: Contoso Info <info@contoso.com>\r\nTo: x@example.net\r\nSubject: s\r\n\r\nbody\r\n"
    on_behalf = (b"From: Dave Chen <dave@contoso.com>\r\nSender: Emily Braun <emily@contoso.com>\r\n"
                 b"To: x@example.net\r\nSubject: s\r\n\r\nbody\r\n")
    assert policy.sender_identity(send_as, "emily@contoso.com").address == "info@contoso.com"
    # Exchange Online sends on behalf with the delegate (Sender:) as the envelope sender.
    who = policy.sender_identity(on_behalf, "emily@contoso.com")
    assert (who.address, who.how) == ("emily@contoso.com", "send-on-behalf (Sender:)")
    m = message_of(on_behalf, "emily@contoso.com", dt.datetime.now(UTC))
    assert m.sender == "emily@contoso.com" and m.kind == "new" and m.body.strip() == "body"


def test_a_sender_field_that_is_not_the_envelope_sender_is_ignored() -> None:
    """Issue #10, finding 6: From: alice, Sender: dave (the CEO), envelope alice must not earn
    alice dave's signature; the From: mailbox's rules apply."""
    forged = (b"From: Alice <alice@contoso.com>\r\nSender: Dave Chen <dave@contoso.com>\r\n"
              b"To: x@example.net\r\nSubject: s\r\n\r\nbody\r\n")
    who = policy.sender_identity(forged, "alice@contoso.com")
    assert (who.address, who.how) == ("alice@contoso.com", "from")



def test_a_utf8_from_is_read_alike_by_binding_and_policy(tmp_path: Path) -> None:
    """RFC 6532 lets an SMTPUTF8 message carry raw UTF-8 in From: and Subject:. Binding read the
    From: domain as UTF-8 while policy read the same field as latin-1, so an EAI sender's own
    rules and directory entry never applied ("jã¶rg@…"). One parse now serves both."""
    from relay import binding
    from relay.mime import headers

    raw = ("From: Jörg Müller <jörg@bücher.example>\r\nTo: x@example.net\r\n"
           "Subject: Angebot für Jörg\r\n\r\nbody\r\n").encode()
    top = headers.index(raw)
    assert binding.from_domains(top) == ["xn--bcher-kva.example"]
    assert policy.sender_identity(raw, "jörg@bücher.example", top).address == "jörg@bücher.example"
    assert top.parsed["from"] == ("jörg@bücher.example",)  # the one parse both read
    m = message_of(raw, "jörg@bücher.example", dt.datetime.now(UTC), top)
    assert (m.sender, m.subject) == ("jörg@bücher.example", "Angebot für Jörg")
    csv = DIRECTORY + "jörg@bücher.example,Jörg Müller,Buyer,Sales,,,\n"
    assert render(tmp_path, "<p>{{ user.displayName }}, {{ user.jobTitle }}</p>\n", csv,
                  m.sender) == "<p>Jörg Müller, Buyer</p>\n"
    # Not UTF-8 (a legacy 8-bit header): kept as latin-1 text, as before.
    legacy = b"From: J\xf6rg <j@contoso.com>\r\nSubject: f\xfcr\r\n\r\nbody\r\n"
    assert message_of(legacy, "", dt.datetime.now(UTC)).subject == "f\xfcr"
    assert policy.sender_identity(legacy, "").address == "j@contoso.com"

# --- templates ---------------------------------------------------------------------------------------


def render(tmp: Path, template: str, csv: str = DIRECTORY, sender: str = "alice@contoso.com") -> str:
    p = tenant(tmp, '[[rule]]\nname = "R"\nnew = "t"\n', templates={"t.html.j2": template}, directory_csv=csv)
    m = msg(sender)
    sig, _ = p.render(p.rules.outcome(p.directory, m, "x@e.net"), m, ["x@e.net"])
    assert sig is not None
    return sig.html


def test_missing_attributes_render_nothing_and_empty_lines_vanish(tmp_path: Path) -> None:
    html = render(tmp_path, "<b>{{ user.displayName }}</b><br>\nM {{ user.mobilePhone }}<br>\n"
                            "F {{ user.faxNumber }}<br>\n{{ user.nonexistent.deeper }}x\nstatic line\n",
                  sender="bob@contoso.com")
    assert "None" not in html and "M " not in html and "F " not in html
    # like "remove text if empty": a line whose placeholders are all empty goes, static text included
    assert html == "<b>Bob Kelly</b><br>\nstatic line\n"


def test_hostile_attribute_values_are_escaped(tmp_path: Path) -> None:
    csv = DIRECTORY.replace("Alice Wilber", '"<script>alert(1)</script> ""Q"" \'s"')
    html = render(tmp_path, '<a title="{{ user.displayName }}">{{ user.displayName }}</a>\n', csv=csv)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '"Q"' not in html and "&#34;Q&#34;" in html and "&#39;s" in html


def test_rtl_and_emoji_names(tmp_path: Path) -> None:
    csv = DIRECTORY.replace("Alice Wilber", "ليلى العلي 🌟").replace("Bob Kelly", "דוד לוי 👋")
    html = render(tmp_path, "<p dir=\"auto\">{{ user.displayName }}</p>\n", csv=csv)
    assert "ليلى العلي 🌟" in html
    from relay.mime.stamper import Signature, stamp

    raw = b"From: alice@contoso.com\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nHi\r\n"
    out = stamp(raw, Signature(html, "ליאור 👋\n"), mail_from="alice@contoso.com").data
    assert b"charset=utf-8" in out


@pytest.mark.parametrize("evil", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ user.__class__.__init__.__globals__ }}",
    "{{ image.__globals__['__builtins__'] }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
])
def test_sandbox_escapes_are_refused_at_render_and_pass_through(tmp_path: Path, evil: str) -> None:
    from relay import pipeline

    p = tenant(tmp_path, '[[rule]]\nname = "R"\nnew = "t"\n', templates={"t.html.j2": evil + "\n"})
    m = msg()
    with pytest.raises(policy.RenderError, match=r"t.html.j2: template t: "):
        p.render(p.rules.outcome(p.directory, m, "x@e.net"), m, ["x@e.net"])
    raw = b"From: Alice <alice@contoso.com>\r\nTo: x@e.net\r\nSubject: s\r\n\r\nbody\r\n"
    copies = pipeline.plan_copies(raw, None, policy=p, settings=pipeline.Settings(),
                                  envelope=pipeline.Envelope("alice@contoso.com", ("x@e.net",), dt.datetime.now(UTC)))
    assert copies[0].render_error and copies[0].processed.decision.action == "marked"
    assert copies[0].processed.data.endswith(raw)


def render_sig(tmp: Path, template: str) -> Signature:
    """Alice's signature from a one-rule tenant whose only template is ``template``."""
    p = tenant(tmp, '[[rule]]\nname = "R"\nnew = "t"\n', templates={"t.html.j2": template})
    m = msg()
    sig, _ = p.render(p.rules.outcome(p.directory, m, "x@e.net"), m, ["x@e.net"])
    assert sig is not None
    return sig


def test_plain_text_is_derived_from_html_when_no_text_template(tmp_path: Path) -> None:
    sig = render_sig(tmp_path, "<table><tr><td><b>{{ user.displayName }}</b></td></tr>\n"
                               "<tr><td>{{ user.jobTitle }} &amp; more</td></tr></table>\n")
    assert sig.text == "Alice Wilber\nSales Director & more\n"


def test_images_embedded_or_linked(tmp_path: Path) -> None:
    sig = render_sig(tmp_path, '<img src="{{ image("logo.png") }}">\n<img src="{{ image("logo.png", link=true) }}">\n')
    assert 'src="cid:logo.png"' in sig.html and 'src="https://img.contoso.com/logo.png"' in sig.html
    assert [i.name for i in sig.images] == ["logo.png"] and sig.images[0].content_type == "image/png"


# --- load-time errors ----------------------------------------------------------------------------------


def test_every_error_is_reported_with_file_key_or_line(tmp_path: Path) -> None:
    templates = {"bad.html.j2": "line one\n{{ user.displayName | nosuchfilter }}\n",
                 "syntax.html.j2": "ok\n{% if %}\n", "img.html.j2": "<img src=\"{{ image('missing.png') }}\">\n",
                 "var.html.j2": "{{ secrets.token }}\n", "good.html.j2": "x\n"}
    rules_toml = """
        [[rule]]
        name = "Typos"
        sendres = { all = true }
        new = "nosuch"

        [[rule]]
        name = "Bad window"
        window = { start = 2026-02-01T00:00:00, end = 2026-01-01T00:00:00, tz = "Mars/Olympus" }
        new = "good"

        [[rule]]
        name = "Bad regex"
        senders = { where = [{ attribute = "jobTitle", matches = "([" }], groups = ["Nope"] }
        new = "good"

        [[rule]]
        name = "Bad attribute"
        senders = { where = [{ attribute = "shoeSize", equals = "42" }] }
        recipients = { scope = "sideways" }
        new = "good"
    """
    with pytest.raises(PolicyError) as e:
        tenant(tmp_path, rules_toml, templates=templates)
    errs = "\n".join(e.value.errors)
    for expected in ("bad.html.j2:2: No filter named 'nosuchfilter'", "syntax.html.j2:2:",
                     "img.html.j2:1: image 'missing.png' not found", "var.html.j2:1: unknown variable 'secrets'",
                     "rule[0] ('Typos').sendres: unknown key", "rule[0] ('Typos').new: template 'nosuch' not found",
                     "rule[1] ('Bad window').window.tz: unknown time zone 'Mars/Olympus'",
                     "rule[2] ('Bad regex').senders.where[0].matches: bad regular expression",
                     "rule[2] ('Bad regex').senders.groups: unknown group 'Nope'",
                     "rule[3] ('Bad attribute').senders.where[0].attribute: unknown attribute 'shoeSize'",
                     "rule[3] ('Bad attribute').recipients.scope: expected all, internal or external"):
        assert expected in errs, (expected, errs)


def test_reversed_window_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="is not after start"):
        tenant(tmp_path, '[[rule]]\nname = "W"\nwindow = { start = 2026-02-01T00:00:00, end = 2026-01-01T00:00:00 }\n'
               'new = "sig"\n')


# --- splitting ------------------------------------------------------------------------------------------


def test_split_into_fewest_copies(tmp_path: Path) -> None:
    p = tenant(tmp_path, """
        [[rule]]
        name = "External"
        recipients = { scope = "external" }
        new = "sig"

        [[rule]]
        name = "Internal"
        recipients = { scope = "internal" }
        new = "short"
    """)
    rcpts = ["a@example.net", "bob@contoso.com", "b@example.org", "carol@contoso.com", "c@example.com"]
    groups = p.plan(msg(), rcpts)
    assert [g for _, g in groups] == [["a@example.net", "b@example.org", "c@example.com"],
                                     ["bob@contoso.com", "carol@contoso.com"]]
    one = p.plan(msg(), ["a@example.net", "b@example.org"])
    assert len(one) == 1


def test_fast_match_agrees_with_the_explanation(tmp_path: Path) -> None:
    """The hot-path matcher and the explained checks must never disagree."""
    from relay.rules import _message_checks, _rule_matches

    sample = Path(__file__).resolve().parents[2] / "rules" / "contoso"
    names_ = ["holiday-banner", "sales", "short", "partner", "support", "default", "internal", "disclaimer"]
    p = tenant(tmp_path, (sample / "rules.toml").read_text(), templates={f"{n}.html.j2": "<p>x</p>\n" for n in names_},
               directory_csv=(sample / "directory.csv").read_text(), groups=(sample / "groups.toml").read_text())
    senders = ["alice@contoso.com", "bob@contoso.com", "carol@contoso.com", "emily@contoso.com", "info@contoso.com",
               "x@elsewhere.example"]
    rcpts = ["a@example.net", "bob@contoso.com", "carol@contoso.com", "x@fabrikam.example", "ceo@northwind.example"]
    for s in senders:
        for subject in ("hello", "the quote", "quote [nosig]"):
            for at in (dt.datetime(2026, 6, 1, tzinfo=UTC), dt.datetime(2026, 12, 10, tzinfo=UTC)):
                m = msg(s, subject=subject, at=at)
                for r in rcpts:
                    u = p.directory.user(r)
                    internal = p.rules.internal(r)
                    for rule in p.rules.rules:
                        slow = all(ok for _, ok in _message_checks(rule, m, r, u, internal))
                        assert _rule_matches(rule, m, r, u, internal) == slow, (s, subject, r, rule.name)
                        su = p.directory.user(s)
                        assert rule.senders.matches(s, su, True) == all(
                            ok for _, ok in rule.senders.checks(s, su, True))


def test_outcome_cache_agrees_with_uncached_evaluation(tmp_path: Path) -> None:
    sample = Path(__file__).resolve().parents[2] / "rules" / "contoso"
    names_ = ["holiday-banner", "sales", "short", "partner", "support", "default", "internal", "disclaimer"]
    p = tenant(tmp_path, (sample / "rules.toml").read_text(), templates={f"{n}.html.j2": "<p>x</p>\n" for n in names_},
               directory_csv=(sample / "directory.csv").read_text(), groups=(sample / "groups.toml").read_text())
    senders = ["alice@contoso.com", "bob@contoso.com", "carol@contoso.com", "emily@contoso.com", "info@contoso.com"]
    rcpts = ["a@example.net", "b@example.net", "bob@contoso.com", "x@fabrikam.example", "ceo@northwind.example",
             "z@contoso.onmicrosoft.com"]
    for _ in range(2):  # second round is served from the cache
        for s in senders:
            for subject, body in (("hello", ""), ("the Quote", ""), ("x", "see the contract"), ("quote [nosig]", "")):
                for at in (dt.datetime(2026, 6, 1, tzinfo=UTC), dt.datetime(2026, 12, 10, tzinfo=UTC),
                           dt.datetime(2026, 11, 30, 23, 0, tzinfo=UTC),
                           dt.datetime(2026, 11, 30, 22, 59, tzinfo=UTC)):
                    for kind in ("new", "reply"):
                        m = msg(s, subject=subject, body=body, kind=kind, at=at)
                        for r in rcpts:
                            assert p.rules.outcome(p.directory, m, r) == p.rules.outcome_uncached(p.directory, m, r)


def test_keyword_hits_find_overlapping_keywords() -> None:
    from relay.rules import _Index

    idx = _Index(frozenset({"quote", "quotes", "tes", "contract"}), None, (), frozenset())
    idx = _Index.build([])  # no keywords: nothing to find
    assert idx.keyword_hits("anything") == frozenset()
    import re as _re

    kws = frozenset({"quote", "quotes", "tes", "contract"})
    rx = _re.compile("(?=(" + "|".join(_re.escape(k) for k in sorted(kws, key=len, reverse=True)) + "))")
    idx = _Index(kws, rx, (), frozenset())
    assert idx.keyword_hits("Two QUOTES and a Contract") == {"quote", "quotes", "tes", "contract"}


def test_the_body_is_decoded_only_for_rules_that_read_it(tmp_path: Path) -> None:
    """plan_copies decodes a message's body text (an HTML parse for HTML-only mail) only when a
    keyword condition reads the body (RuleSet.reads_body); either way a body keyword is found."""
    from relay import pipeline

    html_only = (b"From: alice@contoso.com\r\nTo: x@example.net\r\nSubject: Hello\r\nMIME-Version: 1.0\r\n"
                 b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>see the contract</p></body></html>\r\n")
    env = pipeline.Envelope("alice@contoso.com", ("x@example.net",), dt.datetime(2026, 6, 1, 12, tzinfo=UTC))
    cases = [('in = ["subject"]', False, ""), ("", True, "disclaimer:Legal"),
             ('in = ["body"]', True, "disclaimer:Legal"), ('in = ["subject", "body"]', True, "disclaimer:Legal")]
    for i, (where, reads, expected) in enumerate(cases):
        inner = ", ".join(x for x in ('trigger = ["contract"]', where) if x)
        p = tenant(tmp_path / str(i), f'[[rule]]\nname = "Legal"\nsection = "disclaimer"\nkeywords = {{ {inner} }}\n'
                   'new = "legal"\n')
        assert p.rules.reads_body() is reads
        inbound = pipeline.accept(html_only, pipeline.Settings())
        copies = pipeline.run(inbound, policy=p, envelope=env, settings=pipeline.Settings())
        assert [c.sections for c in copies] == [expected]


def test_rules_without_body_keywords_plan_the_same_without_the_body(tmp_path: Path) -> None:
    """Rules that read no body (keywords on the subject only, and other conditions) give the same
    outcome for every corpus message whether or not its body was decoded."""
    p = tenant(tmp_path, """
        [[rule]]
        name = "Legal"
        section = "disclaimer"
        keywords = { trigger = ["contract", "re:"], suppress = ["[nosig]"], in = ["subject"] }
        new = "legal"
        [[rule]]
        name = "Sales"
        senders = { groups = ["Sales"] }
        recipients = { scope = "external" }
        new = "sig"
        reply = "short"
    """)
    assert not p.rules.reads_body()
    at = dt.datetime(2026, 6, 1, 12, tzinfo=UTC)
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "tests" / "data").rglob("*.eml")):
        raw = path.read_bytes()
        with_body = message_of(raw, "alice@contoso.com", at)
        without = message_of(raw, "alice@contoso.com", at, body=False)
        assert without.body == "" and without.subject == with_body.subject
        for rcpt in ("x@example.net", "bob@contoso.com"):
            assert p.rules.outcome_uncached(p.directory, with_body, rcpt) == \
                   p.rules.outcome_uncached(p.directory, without, rcpt)
