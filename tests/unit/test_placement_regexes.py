"""The faster forms of placement's regexes find exactly what the old forms found (issue #14).

Several reply-marker searches in :mod:`relay.mime.placement` were rewritten for speed: the
line-anchored text rules ("^" with re.M became a literal "\\n" searched in "\\n" + text), the
attribution keywords (grouped by first character), two HTML markers (an optional leading element
folded behind a literal "<") and the history hint (case-insensitive search became a search in the
lower-cased text). Each old form is kept here verbatim and compared with the new one on every
text and HTML body of the public corpora in tests/data and on generated input.
"""

from __future__ import annotations

import email
import email.policy
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.mime import placement as P

DATA = Path(__file__).resolve().parent.parent / "data"

# --- the old forms, as they were before this change ---------------------------------------------

OLD_TEXT_RULES = {
    "original-message": re.compile(r"^[ \t]*[-\u2010]{2,}\s*" + P._ORIGINAL + r"\s*[-\u2010]{2,}(?=\s|$)",
                                   re.M | re.I),
    "outlook-separator": re.compile(r"^_{10,}[ \t]*\r?\n(?:[ \t]*\r?\n)?\*?" + P._FROM_WORDS + r"\*?\s?:",
                                    re.M | re.I),
    "header-block": re.compile(
        r"^" + P._hdr(P._FROM_WORDS) + P._NEXT_LINES + P._hdr(P._SENT_WORDS) + r"|^" + P._hdr(P._SENT_WORDS)
        + P._NEXT_LINES + P._hdr(P._FROM_WORDS) + r"|^" + P._hdr(P._SENT_WORDS) + r"[^\n]*\r?\n"
        + P._hdr(P._TO_WORDS), re.M | re.I),
    "forwarded": re.compile(r"^[ \t]*(?:(?:" + P._BEGIN_FORWARDED + r")\s*:?[ \t]*\r?$|-{3,}\s*" + P._FORWARDED
                            + r"\s*-{3,}(?=\s|$))", re.M | re.I),
}
OLD_QUOTE_LINE = re.compile(r"^[ \t]*>(?![^\n]*<<[ \t]*\r?$)", re.M)
OLD_ATTR_KEY = re.compile(r"wrote|writes|schrieb|[ée]crit|escribi|scritto|schreef|pisze|napisa|escreveu|skrev|"
                          r"kirjoitti|написал|пишет|пише|написав|写道|寫道|来信|撰写|書きました|のメッセージ|年|napsal|yazdı|"
                          r"írta|GMT[+-]|gmt[+-]|sent|geschreven|viết|>:|> :")
OLD_HTML = {
    "html:outlook-desktop": re.compile(
        rb"(?:<div>\s*)?<div[^>]*border-top\s*:\s*(?:solid\s+#(?:e1e1e1|b5c4df)|#(?:e1e1e1|b5c4df)\s+[\d.]+pt\s+solid)"
        rb"[^>]*>"),
    "html:apple-cite": re.compile(
        rb"""(?:<div[^>]*>\s*(?:<br[^>]*>\s*)*)?<blockquote[^>]*\btype\s*=\s*["']?cite\b"""),
}
OLD_HINT = re.compile(r"wrote:|schrieb|a écrit|^(?:from|von|de)\s?:|-----|^>", re.I | re.M)

NEW_TEXT_RULES = dict(P._TEXT_RULES)
NEW_HTML = {rule: rx for rule, _needle, rx in P._HTML_MARKERS}


# --- material: every text and HTML body of the corpora, and generated input ---------------------

def _bodies() -> tuple[list[str], list[bytes]]:
    texts: list[str] = []
    htmls: list[bytes] = []
    for path in sorted(DATA.rglob("*.eml")):
        try:
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
        except Exception:  # a corpus file the stdlib cannot parse is simply not used
            continue
        for part in msg.walk():
            ctype = part.get_content_type()
            if ctype not in ("text/plain", "text/html"):
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes) or not payload:
                continue
            if ctype == "text/html":
                htmls.append(payload.lower())
                texts.append(P._project(payload.lower(), 0, len(payload))[0])  # the HTML's visible text
            else:
                try:
                    texts.append(payload.decode(part.get_content_charset() or "utf-8", "replace"))
                except LookupError:  # a charset Python does not know
                    texts.append(payload.decode("latin-1"))
    return texts, htmls


TEXTS, HTMLS = _bodies()

_TEXT_TOKENS = ["\n", "\r\n", " ", "\t", ":", "*", "**", ">", "> ", "-", "-----", "___________", "\u2010\u2010",
                "From", "from", "FROM", "Von", "De", "de", "Sent", "Date", "Envoyé", "Envoyé\nle", "Message du",
                "To", "À", "Para", "Original Message", "Forwarded message", "Begin forwarded message", "wrote",
                "writes", "schrieb", "écrit", "ecrit", "a écrit", "пишет", "пише", "написал", "写道", "GMT+",
                "gmt-", "sent", "x", "Alice", "Bob <bob@example.com>", "On Mon, 1 Jan 2024", "<<", "İ", "ı", "ſ",
                "SCHRİEB", "WROTE:", "ſchrieb", "K"]
_HTML_TOKENS = [b"<div>", b"<div ", b"<div", b"<div style='border-top:solid #e1e1e1 1.0pt;padding:3pt'>",
                b"border-top:#b5c4df 1.0pt solid", b">", b"<", b" ", b"\n", b"\t", b"<br>", b"<br/>",
                b"<blockquote type=cite>", b"<blockquote type=\"cite\">", b"<blockquote", b"type=cite",
                b"<p>", b"x", b"</div>"]

texts_st = st.lists(st.sampled_from(_TEXT_TOKENS), max_size=40).map("".join)
htmls_st = st.lists(st.sampled_from(_HTML_TOKENS), max_size=30).map(b"".join)


def test_the_corpora_are_there() -> None:
    assert len(TEXTS) > 300 and len(HTMLS) > 100  # the comparisons below run on real mail


# --- the comparisons --------------------------------------------------------------------------------

def _ends(text: str, rx: re.Pattern[str]) -> set[int]:
    """Search bounds worth trying: the whole text, fractions of it, and around where each match
    ends (a bound one off from the right one cuts a match short, or lets "$" match early)."""
    ends = {len(text), len(text) // 2, len(text) // 3}
    for m in rx.finditer(text):
        ends.update(e for e in (m.end() - 1, m.end(), m.end() + 1) if 0 <= e <= len(text))
    return ends


def _same_text_rules(text: str) -> None:
    lined = P._lined(text)
    for rule, old in OLD_TEXT_RULES.items():
        new = NEW_TEXT_RULES[rule]
        # Where matches start (all _earliest uses), over the whole text and with the bounds it passes.
        assert [m.start() for m in old.finditer(text)] == [m.start() for m in new.finditer(lined)], rule
        for end in _ends(text, old):
            a = old.search(text, 0, end)
            assert (a and a.start()) == P._line_search(new, lined, end), (rule, end)
    assert [m.span() for m in OLD_QUOTE_LINE.finditer(text)] == \
           [(m.start(), m.end() - 1) for m in P._QUOTE_LINE.finditer(lined)]
    for end in _ends(text, OLD_QUOTE_LINE):
        a = OLD_QUOTE_LINE.search(text, 0, end)
        assert (a and a.start()) == P._line_search(P._QUOTE_LINE, lined, end), end
    assert [m.span() for m in OLD_ATTR_KEY.finditer(text)] == [m.span() for m in P._ATTR_KEY.finditer(text)]
    assert (OLD_HINT.search(text) is not None) == P._history_hint(text)


def test_text_rules_agree_on_the_corpora() -> None:
    for text in TEXTS:
        _same_text_rules(text)


@settings(max_examples=400, deadline=None)
@given(texts_st)
def test_text_rules_agree_on_generated_text(text: str) -> None:
    _same_text_rules(text)


def _same_html(html: bytes) -> None:
    for rule, old in OLD_HTML.items():
        assert [m.span() for m in old.finditer(html)] == [m.span() for m in NEW_HTML[rule].finditer(html)], rule


def test_html_markers_agree_on_the_corpora() -> None:
    for html in HTMLS:
        _same_html(html)


@settings(max_examples=400, deadline=None)
@given(htmls_st)
def test_html_markers_agree_on_generated_html(html: bytes) -> None:
    _same_html(html)


def test_the_rewritten_patterns_start_with_a_literal() -> None:
    """Not a timing test (machines here are noisy): the new forms are the kind the regex engine
    can skip through. A pattern that must start with a literal character gets a literal or
    charset prefix in its compiled INFO block; the old forms had none."""
    def starts_with_literal(rx: re.Pattern[str] | re.Pattern[bytes]) -> bool:
        return bool(re.match(r"\\n|<|[\w]", rx.pattern if isinstance(rx.pattern, str) else rx.pattern.decode()))

    assert all(starts_with_literal(rx) for rx in NEW_TEXT_RULES.values())
    assert all(NEW_HTML[r].pattern.startswith(b"<") for r in OLD_HTML)
    assert not any(OLD_HTML[r].pattern.startswith(b"<") for r in OLD_HTML)


@pytest.mark.skipif(sys.maxunicode < 0x10FFFF, reason="needs every code point")
def test_lower_folds_like_ignorecase_for_the_hint_letters() -> None:
    """_history_hint searches text.lower() for lower-case literals instead of searching text with
    re.I. That is the same search when, for every character c outside _FOLDS_APART, c.lower() is
    one character (offsets do not move), and equals a pattern character x exactly when re.I takes
    c for x; and white space stays white space. Checked for every code point."""
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    apart = set(P._FOLDS_APART)
    everything = "".join(chars)
    by_lower: dict[str, set[str]] = defaultdict(set)
    for c in chars:
        low = c.lower()
        if c not in apart:
            assert len(low) == 1, hex(ord(c))
        by_lower[low].add(c)
    for x in set("wrote:schrieb a écrit from von de -\n>"):
        ignorecase = set(re.findall(re.escape(x), everything, re.I))
        assert by_lower[x] - apart == ignorecase - apart, repr(x)
    spaces = set(re.findall(r"\s", everything))
    assert {c for c in chars if c not in apart and c.lower() in spaces} == spaces - apart


def old_project(lower: bytes, start: int, end: int) -> tuple[str, list[int], list[int]]:
    """placement._project before it used findall (a finditer loop over _TOKEN), verbatim."""
    chunks: list[bytes] = []
    tpos: list[int] = []
    bpos: list[int] = []
    n = 0
    for m in P._TOKEN.finditer(lower, start, end):
        tok = m.group()
        if tok[:1] == b"<":
            if P._BLOCK_TAG.match(tok):
                chunks.append(b"\n")
                tpos.append(n)
                bpos.append(m.start())
                n += 1
            continue
        piece = P._ENTITIES.get(tok, tok)
        chunks.append(piece)
        tpos.append(n)
        bpos.append(m.start())
        n += len(piece)
    return b"".join(chunks).decode("utf-8", "replace"), tpos, bpos


def _same_projection(html: bytes) -> None:
    n = len(html)
    for start, end in {(0, n), (1, n), (0, n // 2), (n // 3, n), (P._body_start(html), n)}:
        assert P._project(html, start, end) == old_project(html, start, end), (start, end)


def test_the_projection_is_the_same_on_the_corpora() -> None:
    for html in HTMLS:
        _same_projection(html)


_PROJ_TOKENS = [*_HTML_TOKENS, b"<!-- c -->", b"<!--", b"-->", b"<style>x</style>", b"<style>", b"</style>",
                b"&nbsp;", b"&amp;", b"&", b"&lt", b"text", b"<br>", b"<p>", b"</p>", b"<", b"<<", b"\xc3\xa9",
                b"<head><title>t</title></head>", b"<script>a<b</script>", b"<div", b"on Mon, Bob wrote:"]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(_PROJ_TOKENS), max_size=40).map(b"".join))
def test_the_projection_is_the_same_on_generated_html(html: bytes) -> None:
    _same_projection(html)
