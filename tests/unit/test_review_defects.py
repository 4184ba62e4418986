"""Issue #11: the defects a code review found by reading and reproducing. Each test failed before its fix."""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
from pathlib import Path

import pytest

from relay import cli, policy
from relay.rules import Message
from tests.unit.test_rules import TEMPLATES, UTC, msg, tenant

URGENT = '''
[[rule]]
name = "Offer"
keywords = { trigger = ["urgent offer"] }
new = "sig"
'''


# 1. the memo keys on what the matcher reads ------------------------------------------------------

def test_keyword_spanning_subject_and_body_is_not_served_from_another_messages_memo(tmp_path: Path) -> None:
    p = tenant(tmp_path, URGENT)
    a = msg(subject="urgent", body="offer inside")  # the matcher reads "urgent offer inside"
    b = msg(subject="hello", body="offer inside")
    assert [s.rule for s in p.rules.outcome(p.directory, a, "x@example.net")] == ["Offer"]
    assert p.rules.outcome(p.directory, b, "x@example.net") == p.rules.outcome_uncached(p.directory, b,
                                                                                         "x@example.net") == ()


# 2. body keywords are read from the decoded text, then bounded ------------------------------------

def test_body_keywords_survive_a_cut_inside_a_base64_quantum_or_a_character() -> None:
    text = ("é" * 40_000 + " urgent offer ").encode()  # the keyword sits in the first 64 K characters
    body = base64.encodebytes(text + b"x" * 200_000).replace(b"\n", b"\r\n")
    raw = (b"From: alice@contoso.com\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body)
    m = policy.message_of(raw, "alice@contoso.com", dt.datetime(2026, 6, 1, tzinfo=UTC))
    assert "urgent offer" in m.body
    assert len(m.body) <= policy.KEYWORD_BODY_CHARS


# 3. a template or directory file that is not UTF-8 is a named error --------------------------------

def test_non_utf8_template_and_directory_are_named_errors(tmp_path: Path) -> None:
    templates = dict(TEMPLATES)
    with pytest.raises(policy.PolicyError) as e:
        tenant(tmp_path, '[[rule]]\nname = "R"\nnew = "sig"\n', templates=templates,
               directory_csv="mail,displayName\nalice@contoso.com,Zo\xeb\n")  # str: written as UTF-8
    del e
    sdir = tmp_path / "signatures" / "contoso"
    (sdir / "sig.html.j2").write_bytes("<p>Caf\xe9 {{ user.displayName }}</p>\n".encode("latin-1"))
    (tmp_path / "rules" / "contoso" / "directory.csv").write_bytes("mail,displayName\nalice@contoso.com,Zo\xeb\n"
                                                                    .encode("latin-1"))
    with pytest.raises(policy.PolicyError) as err:
        policy.Policy.load("contoso", tmp_path / "rules" / "contoso", sdir, frozenset({"contoso.com"}))
    text = "\n".join(err.value.errors)
    assert "sig.html.j2:1: not UTF-8" in text and "0xe9" in text
    assert "directory.csv:2: not UTF-8" in text and "0xeb" in text


# 4. tenants add validates before it writes, and writes atomically -----------------------------------

def test_tenants_add_with_a_bad_domain_leaves_nothing_behind(deployment: object,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfgp = deployment.config_path  # type: ignore[attr-defined]
    code = cli.main(["tenants", "add", "northwind", "--config", str(cfgp), "--id",
                     "0d7e9b52-1c3a-4f6e-8a2b-9c4d5e6f7a8b", "--initial-domain", "northwind.onmicrosoft.com",
                     "--domain", "bad_domain..example"])
    assert code != 0
    assert "--domain: not a domain name: 'bad_domain..example'" in capsys.readouterr().err
    assert not (cfgp.parent / "rules" / "northwind").exists()
    assert cli.main(["check", "--config", str(cfgp)]) == 0  # later commands still work


# 5. the memo caches are safe under concurrent use --------------------------------------------------

def test_rule_and_render_memos_agree_with_uncached_answers_under_threads(tmp_path: Path) -> None:
    p = tenant(tmp_path, URGENT + '\n[[rule]]\nname = "All"\nnew = "sig"\n')
    subjects = ["urgent", "hello", "urgent offer", "other"]
    bodies = ["offer", "", "x", "urgent"]
    senders = ["alice@contoso.com", "bob@contoso.com", "carol@contoso.com", "dave@contoso.com"]

    def work(i: int) -> bool:
        m = Message(senders[i % 4], subjects[i % 3], bodies[i % 4], "new", dt.datetime(2026, 6, 1, tzinfo=UTC))
        rcpt = f"r{i % 7}@example.net"
        got = p.rules.outcome(p.directory, m, rcpt)
        if got != p.rules.outcome_uncached(p.directory, m, rcpt):
            return False
        sig, _ = p.render(got, m, [rcpt])
        if not got:
            return sig is None
        expect = p.templates._render(p.templates.templates[got[0].template], p.context(m, [rcpt]))
        return sig is not None and sig.html == expect.html

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(4000)))


# dead code removed: Entry.refused (never written) -- a 0.1.0 spool still loads ---------------------

def test_spool_entries_written_by_0_1_0_still_load(tmp_path: Path) -> None:
    import json

    from relay.delivery.spool import Spool

    meta = {"id": "Q1-0", "tenant": "contoso", "mail_from": "a@contoso.com", "rcpts": ["b@example.net"],
            "smtputf8": False, "created": 1.0, "next_attempt": 1.0, "attempts": 0, "last_error": "", "refused": {}}
    (tmp_path / "Q1-0.json").write_text(json.dumps(meta))
    (tmp_path / "Q1-0.eml").write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    [e] = Spool(tmp_path).prepare()
    assert e.id == "Q1-0" and e.rcpts == ["b@example.net"]
