"""Where the signature goes: under the newest reply, above the quoted history. Pure, on text.

Each finder returns an offset into the *decoded* body and the rule of thumb that matched, so the
decision is explainable ("html:outlook-desktop", "text:original-message", "html:body-end"...).
Reply markers are searched outside HTML comments (Outlook's ``<!--[if mso]>`` blocks included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Placement:
    offset: int
    rule: str


# "From:" in the reply header block of Outlook and friends: EN, DE, FR, ES, IT, NL, PL, PT.
_FROM_WORDS: Final = r"(?:From|Von|De|Da|Van|Od|Från|Fra|Lähettäjä)"
_SENT_WORDS: Final = (r"(?:Sent|Date|Gesendet|Datum|Envoy[ée]|Enviado|Fecha|Inviato|Data|Verzonden|Wys[łl]ano|"
                      r"Enviada|Skickat|Sendt)")

# HTML markers: (rule, literal that must occur for the regex to be worth running, regex on the
# ASCII-lower-cased document).
_CLASS: Final = rb"""<div[^>]*\bclass\s*=\s*["']?[^"'>]*\b"""
_HTML_MARKERS: Final = [
    ("html:outlook-web-appendonsend", b"appendonsend",
     re.compile(rb"""<div[^>]*\bid\s*=\s*["']?appendonsend\b""")),
    ("html:outlook-web-hr", b"tabindex", re.compile(rb"""<hr\b[^>]*\btabindex\s*=\s*["']?-1\b[^>]*>""")),
    ("html:outlook-web-divrplyfwdmsg", b"divrplyfwdmsg",
     re.compile(rb"""<div[^>]*\bid\s*=\s*["']?divrplyfwdmsg\b""")),
    ("html:outlook-desktop", b"border-top",
     re.compile(rb"(?:<div>\s*)?<div[^>]*border-top\s*:\s*solid\s+#(?:e1e1e1|b5c4df)[^>]*>")),
    ("html:gmail", b"gmail_quote", re.compile(_CLASS + rb"gmail_quote(?:_container)?\b")),
    ("html:thunderbird-cite", b"moz-cite-prefix", re.compile(_CLASS + rb"moz-cite-prefix\b")),
    ("html:thunderbird-forward", b"moz-forward-container", re.compile(_CLASS + rb"moz-forward-container\b")),
    ("html:yahoo", b"yahoo_quoted", re.compile(rb"""<div[^>]*\b(?:class|id)\s*=\s*["']?[^"'>]*\byahoo_quoted""")),
    ("html:apple-forward", b"begin forwarded message",
     re.compile(rb"(?:<div[^>]*>\s*)(?:<br[^>]*>\s*)*(?=<div[^>]*>\s*begin forwarded message:)")),
    ("html:apple-cite", b"cite",
     re.compile(rb"""(?:<div[^>]*>\s*(?:<br[^>]*>\s*)*)?<blockquote[^>]*\btype\s*=\s*["']?cite\b""")),
]
# A localized Outlook header block without the styled div (Outlook for Mac, pasted replies).
_HTML_FROM_BLOCK: Final = re.compile(
    rb"<b>\s*(?:<span[^>]*>\s*)?(?:from|von|de|da|van|od|fr\xc3\xa5n|fra)\s?:\s*(?:</span>\s*)?</b>.{0,600}?"
    rb"<b>\s*(?:<span[^>]*>\s*)?(?:sent|date|gesendet|datum|envoy(?:e|\xc3\xa9)|enviado|fecha|inviato|data|verzonden|"
    rb"wys(?:l|\xc5\x82)ano|enviada|skickat|sendt)\s?:", re.S)
_COMMENT: Final = re.compile(rb"<!--.*?-->", re.S)


def _comment_spans(lower: bytes) -> list[tuple[int, int]]:
    return [m.span() for m in _COMMENT.finditer(lower)]


def _in_spans(pos: int, spans: list[tuple[int, int]]) -> bool:
    return any(a <= pos < b for a, b in spans)


def find_html(html: str, *, bottom: bool = False, utf8: bytes | None = None) -> Placement:
    """Insertion offset in an HTML body: above the first quoted-history marker, else before the
    real ``</body>`` (not one inside a comment), else before ``</html>``, else the end.

    Markup is ASCII, so the search runs on the UTF-8 bytes lower-cased with ``bytes.lower()``
    (fast, length-preserving); only the final offset is converted back to characters. ``utf8``
    is ``html`` already encoded as UTF-8, when the caller has it (a UTF-8 leaf's decoded bytes)."""
    raw = utf8 if utf8 is not None else html.encode("utf-8", "surrogatepass")  # the caller may have it
    lower = raw.lower()
    spans = _comment_spans(lower) if b"<!--" in lower else []
    found = _find_html_bytes(lower, spans, bottom)
    offset = len(raw[:found.offset].decode("utf-8", "surrogatepass"))
    return Placement(offset, found.rule)


def _find_html_bytes(lower: bytes, spans: list[tuple[int, int]], bottom: bool) -> Placement:
    if not bottom:
        best: Placement | None = None
        for rule, needle, rx in _HTML_MARKERS:
            if needle not in lower:
                continue
            for m in rx.finditer(lower):
                if not _in_spans(m.start(), spans):
                    if best is None or m.start() < best.offset:
                        best = Placement(m.start(), rule)
                    break
        m2 = next((m for m in _HTML_FROM_BLOCK.finditer(lower) if not _in_spans(m.start(), spans)), None) \
            if b"</b>" in lower else None
        if m2 is not None and (best is None or m2.start() < best.offset):
            # back up to the start of the block element that holds the "From:" line
            start = max(lower.rfind(tag, 0, m2.start()) for tag in (b"<div", b"<p", b"<hr"))
            best = Placement(start if start >= 0 else m2.start(), "html:header-block")
        if best is not None:
            return best
    for rule, tag in (("html:body-end", b"</body"), ("html:html-end", b"</html")):
        pos = len(lower)
        while True:
            pos = lower.rfind(tag, 0, pos)
            if pos < 0 or not _in_spans(pos, spans):
                break
        if pos >= 0:
            return Placement(pos, rule)
    return Placement(len(lower), "html:end")


_TEXT_RULES: Final = [
    ("text:original-message", re.compile(
        r"^-{3,}\s*(?:original message|ursprüngliche nachricht|message d'origine|mensaje original|"
        r"messaggio originale|oorspronkelijk bericht|wiadomość oryginalna|oryginalna wiadomość|"
        r"mensagem original|original meddelelse|ursprungligt meddelande)\s*-{3,}\s*$", re.M | re.I)),
    ("text:outlook-separator", re.compile(
        r"^_{10,}\s*\r?\n(?:\s*\r?\n)?" + _FROM_WORDS + r"\s?:", re.M | re.I)),
    ("text:header-block", re.compile(
        r"^" + _FROM_WORDS + r"\s?:[^\n]*\r?\n(?:[^\n]*\r?\n){0,2}?" + _SENT_WORDS + r"\s?:", re.M | re.I)),
    ("text:attribution", re.compile(
        r"^(?:On\s[^\n]{1,200}?\s(?:wrote|writes)|Am\s[^\n]{1,200}?\sschrieb[^\n]{0,100}|"
        r"Le\s[^\n]{1,200}?\sa\s[ée]crit\s?|El\s[^\n]{1,200}?\sescribi[óo]|Il\s[^\n]{1,200}?\sha\sscritto|"
        r"Op\s[^\n]{1,200}?\sschreef[^\n]{0,100}|W\sdniu\s[^\n]{1,200}?\spisze|Em\s[^\n]{1,200}?\sescreveu)"
        r"\s?:\s*$", re.M | re.I)),
    ("text:forwarded", re.compile(r"^(?:Begin forwarded message|-{3,}\s*Forwarded message\s*-{3,})\s*:?\s*$",
                                  re.M | re.I)),
    ("text:quote", re.compile(r"^>", re.M)),
]


def find_text(text: str, *, bottom: bool = False) -> Placement:
    """Insertion offset in a plain-text body: at the start of the line that opens the quoted
    history (the earliest marker wins), else the end."""
    if not bottom:
        best: Placement | None = None
        for rule, rx in _TEXT_RULES:
            m = rx.search(text)
            if m and (best is None or m.start() < best.offset):
                best = Placement(m.start(), rule)
        if best is not None:
            if best.rule == "text:quote":
                # "On ..., X wrote:" that we did not recognise still belongs to the quote: take the
                # non-empty line right above a ">" block if it ends with ":".
                prev_end = text.rfind("\n", 0, max(best.offset - 1, 0))
                prev = text[prev_end + 1:best.offset].strip()
                if prev.endswith(":"):
                    best = Placement(prev_end + 1, best.rule)
            return best
    return Placement(len(text), "text:end")
