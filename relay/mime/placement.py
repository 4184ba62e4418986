"""Where the signature goes: under the newest reply, above the quoted history. Pure, on text.

Each finder returns an offset into the *decoded* body, the rule that matched, and — when the
choice is a guess — a ``doubt`` an admin can grep for in ``stamp --report``. Decisions:

* **Top-posted reply or forward** (the common case): above the *first* history marker in document
  order — a client's quote container, an attribution ("On … wrote:" in 20-odd languages, wrapped
  over up to three lines), an "Original Message" separator, a forwarded-message marker, or an
  Outlook-style header block (From/Sent in any order and language). For HTML the textual markers
  are found on the visible text of the region before the first structural marker, so an
  attribution split by tags (``On <a>…</a> wrote:``) or sitting outside the ``<blockquote>``
  (iOS Mail, Roundcube, Fastmail) still puts the signature above the attribution.
* **Bottom-posted reply** (quote first, new text after it: Thunderbird, mailing lists): after the
  author's text at the end (``…:bottom-posted``).
* **Interleaved reply** (answers between quoted blocks): the documented rule is *end of message*,
  reported as ``…:inline-reply`` so an admin sees why. Not when the text between two HTML quotes
  is itself a history marker and nothing answers below the last quote: that is a quote pasted
  into the newest text (iCloud, ProtonMail webmail), and the history starts at the marker.
* **No history**: before the real ``</body>`` (not one inside a comment), else ``</html>``, else the
  end; plain text at the end.

Reply markers are searched outside HTML comments (Outlook's ``<!--[if mso]>`` blocks included).
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass
from typing import Final

from relay import wire


@dataclass(frozen=True)
class Placement:
    offset: int
    rule: str
    doubt: str = ""  # why this placement may be wrong ("" when the markers were unambiguous)
    marker_end: int = -1  # end of the marker's own text (an attribution's last line), when known


# --- words of the reply header block and separators, by language -------------------------------------
# EN DE FR ES IT NL PL PT DA SV NO FI RU UK ZH JA CS TR
_FROM_WORDS: Final = (r"(?:From|Von|De|Da|Van|Od|Från|Fra|Lähettäjä|От|Від|发件人|寄件者|差出人|Kimden|Feladó)")
_SENT_WORDS: Final = (r"(?:Sent|Date|Gesendet|Datum|Envoy[ée](?:\sle)?|Enviado|Fecha|Inviato|Data|Verzonden|"
                      r"Wys[łl]ano|Enviada(?:\sem)?|Enviado\sem|Skickat|Sendt|Lähetetty|Päivämäärä|Отправлено|Дата|Надіслано|"
                      r"发送时间|發送時間|日期|送信日時|Odesláno|Gönderildi|Tarih|Elküldve|Message\sdu)")
_TO_WORDS: Final = r"(?:To|An|À|A|Para|Aan|Do|Til|Till|Vastaanottaja|Кому|收件人|宛先|Komu|Kime|Címzett)"
_ORIGINAL: Final = (r"(?:original\s+message|ursprüngliche\s+nachricht|message\s+d'origine|mensaje\s+original|"
                    r"messaggio\s+originale|oorspronkelijk\s+bericht|wiadomość\s+oryginalna|oryginalna\s+wiadomość|"
                    r"mensagem\s+original|original\s+meddelelse|oprindelig\s+meddelelse|ursprungligt\s+meddelande|"
                    r"opprinnelig\s+melding|oprindelig\s+besked|alkuperäinen\s+viesti|исходное\s+сообщение|"
                    r"вихідне\s+повідомлення|原始邮件|原始郵件|元のメッセージ|původní\s+zpráva|özgün\s+ileti|"
                    r"orijinal\s+mesaj|eredeti\s+üzenet)")
_FORWARDED: Final = (r"(?:forwarded\s+message|weitergeleitete\s+nachricht|message\s+transf[ée]r[ée]|"
                     r"mensaje\s+reenviado|messaggio\s+inoltrato|doorgestuurd\s+bericht|"
                     r"wiadomość\s+przekazana\s+dalej|mensagem\s+encaminhada|videresendt\s+meddelelse|"
                     r"vidarebefordrat\s+meddelande|videresendt\s+melding|välitetty\s+viesti|"
                     r"пересылаемое\s+сообщение|转发的邮件|轉寄的郵件|転送メッセージ|"
                     r"переслане\s+повідомлення|перенаправлене\s+повідомлення|"
                     r"přeposlaná\s+zpráva|[İIi]letilen\s+(?:mesaj|[İIi]leti)|továbbított\s+üzenet)")
_BEGIN_FORWARDED: Final = (r"(?:begin\s+forwarded\s+message|anfang\s+der\s+weitergeleiteten\s+nachricht|"
                           r"d[ée]but\s+du\s+message\s+r[ée]exp[ée]di[ée]|inicio\s+del\s+mensaje\s+reenviado|"
                           r"inizio\s+messaggio\s+inoltrato|begin\s+doorgestuurd\s+bericht|"
                           r"[İIi]leti\s+başlangıcı|videresendt\s+melding)")  # Apple Mail TR, NO

# An attribution may wrap over up to five lines (Gmail and Android wrap at ~76 columns; Polymail
# puts "<", "mailto:…" and "> wrote:" on lines of their own), with blank lines between them.
_SPAN: Final = r"[^\n]{0,200}?(?:\r?\n[ \t]*(?:\r?\n)?[^\n]{0,200}?){0,4}?"
# Attributions that open with a fixed word may wrap over up to three lines (Gmail and Android
# wrap at ~76 columns); those that are only recognisable by their verb start on the verb's line
# (the colon may follow on the next one).
_LEAD_ATTRIBUTIONS: Final = "|".join([
    r"On\s" + _SPAN + r"\s(?:wrote|writes|sent)\s?:",  # EN (Gmail, Apple, Thunderbird...)
    r"On\s" + _SPAN + r"<[^<>\s]+@[^<>\s]+>\s(?:wrote|writes)",  # ... without the colon (some webmails)
    r"-{2,}\s*On\s" + _SPAN + r"\swrote\s*(?:-{2,}|:)",  # Zoho "---- On … wrote ----", Yahoo "--- On … wrote:"
    r"-{2,}\s*在\s" + _SPAN + r"\s?撰写\s*-{2,}",  # Zoho ZH "---- 在 星期二, 02 七月 2019 … Name <a> 撰写 ----"
    r"Am\s" + _SPAN + r"\sschrieb[^\n]{0,100}?(?:\r?\n[^\n]{0,100}?)?:",  # DE (Gmail splits "<\naddr>:")
    r"Le\s" + _SPAN + r"\sa\s[ée]crit\s?:",  # FR
    r"El\s" + _SPAN + r"\sescribi[óo]\s?:",  # ES
    r"Il\s" + _SPAN + r"\sha\sscritto\s?:",  # IT
    # NL; Apple Mail: "Op … heeft X het volgende geschreven:"
    r"Op\s" + _SPAN + r"\s(?:schreef|het\svolgende\sgeschreven)[^\n]{0,100}?:",
    r"Vào\s" + _SPAN + r"\sđã\sviết\s?:",  # VI
    r"(?:W\sdniu|Dnia)\s" + _SPAN + r"\s(?:pisze|napisał(?:\(a\)|a)?)\s?:",  # PL
    r"(?:Em|Às)\s" + _SPAN + r"\sescreveu\s?:",  # PT
    r"(?:Den|På)\s" + _SPAN + r"\sskrev" + r"[^\n]{0,200}?:",  # DA, SV
    r"Dne\s" + _SPAN + r"\snapsal(?:\(a\)|a)?\s?:",  # CS (Gmail wraps "<addr>\nnapsal(a):")
    r"\d{4}年\d{1,2}月\d{1,2}日" + _SPAN + r"[:：]",  # JA (Gmail: "2017年11月24日(金) 16:32 Name <a>:")
    r"\d{4}-\d{2}-\d{2}\s\d{1,2}:\d{2}\sGMT[+-]\d{2}:\d{2}\s" + _SPAN + r":",  # old Gmail
])
_LINE: Final = r"[^\n]{0,200}?"
_NEXT: Final = r"(?:\r?\n[^\n]{0,120}?)?"  # the colon may end the following line
_VERB_ATTRIBUTIONS: Final = "|".join([
    _LINE + r"\sskrev" + _LINE + _NEXT + r":",  # NO ("tor. 24. nov. 2017 kl. 16:32 skrev …:"), DA, SV
    _LINE + r"\skirjoitti" + _NEXT + r"\s?:",  # FI
    _LINE + r"\s(?:написал(?:\(а\)|а)?|пишет)" + _NEXT + r"\s?:",  # RU ("… пользователь … написал:")
    _LINE + r"\s(?:пише|написав(?:\(ла\))?|написала)" + _NEXT + r"\s?:",  # UK
    _LINE + r"(?:写道|寫道|来信)\s?[:：]",  # ZH (Gmail "… 于2017年11月24日周五 下午4:32写道：", ProtonMail "… 来信：")
    _LINE + r"(?:書きました|のメッセージ)\s?[:：]",  # JA (Apple, Outlook)
    _LINE + r"\s(?:napsal(?:\(a\)|a)?)" + _NEXT + r"\s?:",  # CS
    _LINE + r"\s(?:şunu\s+yazdı|yazdı)" + _NEXT + r"\s?:",  # TR
    _LINE + r"\s(?:ezt\s)?írta[^\n]{0,100}?:",  # HU (Gmail: "… ezt írta (időpont: …):")
    # "X wrote:", Gmail DE "X schrieb am So., 23.\nJuni 2024, 21:08:"
    _LINE + r"\s(?:wrote|schrieb|a\s[ée]crit|escribi[óo]|ha\sscritto|schreef|escreveu)[^\n]{0,100}?" + _NEXT + r"\s?:",
    r"-{2,}" + _LINE + r"\swrote\s*-{2,}",  # Android "---- John Smith wrote ----"
    # Gmail in locales without a verb (RU "ср, 30 апр. 2025 г. в 15:19, Name <addr>:", KO, ...):
    # a time, then an address closing the line with a colon.
    _LINE + r"\d{1,2}[:.]\d{2}" + _LINE + r"<[^<>\s]+@[^<>\s]+>\s?:",
])

def _hdr(words: str) -> str:
    """A header line's label: ``From:``, Gmail's ``*From:*``, Markdown's ``**From:**``, ``De :``."""
    return r"[ \t]*\*{0,2}" + words + r"(?:\*{0,2}[ \t]?:|[ \t]?:\*{0,2})"


_NEXT_LINES: Final = r"[^\n]*\r?\n(?:[^\n]*\r?\n){0,3}?"  # the rest of the line and up to three more


def _at_line_start(body: str, flags: int = re.M | re.I) -> re.Pattern[str]:
    """A regex for ``body`` at the start of a line, to be searched in ``"\\n" + text``
    (:func:`_lined`). Written with "^" and re.M, the engine tests "^" at every character; with a
    literal "\\n" in front it jumps from line break to line break, 2.5-6x faster on text without
    markers (new messages: every character is searched; benchmarks/stamp_ab.py). A match at
    index i of the prefixed text is a line start at index i of ``text``: the "\\n" before it
    stands for the start of ``text`` or its own line break. Search with :func:`_line_search`
    (tests/unit/test_placement_regexes.py checks both forms agree)."""
    return re.compile(r"\n(?:" + body + r")", flags)


def _lined(text: str) -> str:
    return "\n" + text


def _line_search(rx: re.Pattern[str], lined: str, end: int) -> int | None:
    """Where the first match of ``rx`` (an :func:`_at_line_start` pattern) in ``text[:end]`` starts,
    ``lined`` being _lined(text); None when there is none. Index i of ``lined`` is index i of ``text``."""
    m = rx.search(lined, 0, end + 1)
    return None if m is None else m.start()


# (rule, regex) on plain text (or on the visible text of HTML), anchored at a line start; searched
# in _lined(text).
_TEXT_RULES: Final = [
    # ProtonMail writes the dashes as U+2010 HYPHEN ("‐‐‐‐‐‐‐ Original Message ‐‐‐‐‐‐‐").
    # Yahoo's plain text runs the header block on after the separator ("----- Forwarded Message -----
    # From: …To: …"), so the separators need not end their line.
    ("original-message",
     _at_line_start(r"[ \t]*[-\u2010]{2,}\s*" + _ORIGINAL + r"\s*[-\u2010]{2,}(?=\s|$)")),
    ("outlook-separator", _at_line_start(r"_{10,}[ \t]*\r?\n(?:[ \t]*\r?\n)?\*?" + _FROM_WORDS + r"\*?\s?:")),
    # From … Sent, or Sent … From, or Sent then To on the next line (the two Sent-first forms
    # share their first label: the same line starts match, with one try of it per line).
    ("header-block", _at_line_start(
        _hdr(_FROM_WORDS) + _NEXT_LINES + _hdr(_SENT_WORDS) + r"|" + _hdr(_SENT_WORDS)
        + r"(?:" + _NEXT_LINES + _hdr(_FROM_WORDS) + r"|[^\n]*\r?\n" + _hdr(_TO_WORDS) + r")")),
    ("forwarded", _at_line_start(r"[ \t]*(?:(?:" + _BEGIN_FORWARDED + r")\s*:?[ \t]*\r?$|-{3,}\s*" + _FORWARDED
                                 + r"\s*-{3,}(?=\s|$))")),
]
# A quoted line; not ">>> http://… <<<", a banner some senders put in their own text. In _lined(text).
_QUOTE_LINE: Final = _at_line_start(r"[ \t]*>(?![^\n]*<<[ \t]*\r?$)", re.M)
# Attributions are found from their keyword: a regex that could start on any line with a lazy
# multi-line span backtracks for seconds on a 50 KB body. The keyword is found in C, then the
# anchored attribution is tried on the (at most three) lines that end there.
_LEAD: Final = re.compile(r"[ \t]*(?:" + _LEAD_ATTRIBUTIONS + r")[ \t]*\r?$", re.M | re.I)
_VERB: Final = re.compile(r"(?![ \t]*>)[ \t]*(?:" + _VERB_ATTRIBUTIONS + r")[ \t]*\r?$", re.M | re.I)  # ">": a quote
# Case-sensitive on purpose (an IGNORECASE alternation is several times slower): the verbs are
# written in lower case by every client seen; "GMT" is the one upper-case key. The keys are
#   wrote writes schrieb écrit ecrit escribi scritto schreef pisze napisa escreveu skrev kirjoitti
#   написал пишет пише написав 写道 寫道 来信 撰写 書きました のメッセージ 年 napsal yazdı írta
#   GMT[+-] gmt[+-] sent geschreven viết >: "> :"
# written grouped by their first character, each group keeping the order above: at any position
# only one group can match, and inside it the same alternative as in the flat list wins, so the
# matches are the same; but every alternative now starts with a literal, which lets the regex
# engine skip characters that start none of them (4x faster; tests/unit/test_placement_regexes.py).
_ATTR_KEY: Final = re.compile(r"w(?:rote|rites)|s(?:chrieb|critto|chreef|krev|ent)|écrit|e(?:crit|scribi|screveu)|"
                              r"pisze|n(?:apisa|apsal)|kirjoitti|н(?:аписал|аписав)|п(?:ишет|ише)|写道|寫道|来信|撰写|"
                              r"書きました|のメッセージ|年|yazdı|írta|GMT[+-]|g(?:mt[+-]|eschreven)|viết|>(?::| :)")


# "2011/4/7 Name <addr>" right above a quote: an attribution in a form we do not know by name.
_ADDRESS_LINE: Final = re.compile(r"^\S.{0,150}<[^<>\s@]+@[^<>\s]+>\s*:?$")


_TIME: Final = re.compile(r"\d{1,2}[:.]\d{2}")
_SENTENCE_END: Final = re.compile(r"[.!?][ \t]*\r?$", re.M)


def _line_start(text: str, pos: int) -> int:
    return text.rfind("\n", 0, pos) + 1


def _find_attribution(text: str, end: int) -> tuple[int, int] | None:
    """(start of its first line, end) of the earliest attribution before ``end``, or None."""
    for k in _ATTR_KEY.finditer(text, 0, end):
        line = _line_start(text, k.start())
        nl = text.find("\n", k.end())
        stop = len(text) if nl < 0 else nl
        nl2 = text.find("\n", stop + 1) if nl >= 0 else -1
        # the colon may sit on the next line ("… skrev Name\n<addr>:")
        stops = (stop, len(text) if nl2 < 0 else nl2) if nl >= 0 else (stop,)
        starts = [line]
        for _ in range(4):  # up to four lines above (blank ones included)
            if starts[-1] == 0:
                break
            starts.append(_line_start(text, starts[-1] - 1))
        for st in reversed(starts):  # the earliest start with a leading word owns the attribution
            if st < line and _SENTENCE_END.search(text, st, line):
                continue  # a finished sentence above the verb is prose ("On friday I tried it."), not a wrap
            for sp in stops:
                m = _LEAD.match(text, st, sp)
                if m:
                    return st, m.end()
        for sp in stops:
            m = _VERB.match(text, line, sp)
            if m:
                # Gmail wraps a long attribution: "pe 20. lokakuuta 2017 klo 17.50 John Coe" above
                # "<addr> kirjoitti:". A line right above (no blank line) with a time in it belongs.
                above = _line_start(text, line - 1) if line else line
                if line and _TIME.search(text, above, line - 1) and text[above:line].strip():
                    return above, m.end()
                return line, m.end()
    return None


def _earliest(text: str, prefix: str, lined: str | None = None) -> Placement | None:
    """The earliest history marker in ``text``; ``lined`` is _lined(text) when the caller has it."""
    best: Placement | None = None
    lined = _lined(text) if lined is None else lined
    for rule, rx in _TEXT_RULES:
        at = _line_search(rx, lined, best.offset if best else len(text))
        if at is not None and (best is None or at < best.offset):
            best = Placement(at, f"{prefix}:{rule}")
    attr = _find_attribution(text, best.offset if best else len(text))
    if attr is not None and (best is None or attr[0] < best.offset):
        best = Placement(attr[0], f"{prefix}:attribution", marker_end=attr[1])
    return best


# --- plain text ------------------------------------------------------------------------------------


# Reply markers are looked for in the first SEARCH_WINDOW characters of a plain body (octets of
# an HTML one): a reply's newest text and its first history marker come first, and the searches
# cost about 0.2 s per MB, so a 25 MB plain-text log would cost seconds of CPU (issue #14). A
# longer body with no marker in the window gets the signature at its end, and a doubt says why.
SEARCH_WINDOW: Final = 512 * 1024
_WINDOW_DOUBT: Final = f"body over {SEARCH_WINDOW // 1024} KiB: reply markers looked for in its first " \
                       f"{SEARCH_WINDOW // 1024} KiB only"
_END_RULES: Final = frozenset({"text:end", "text:bottom-posted", "text:inline-reply", "html:body-end", "html:html-end",
                               "html:end", "html:bottom-posted", "html:inline-reply"})


def find_text(text: str, *, bottom: bool = False) -> Placement:
    """Insertion offset in a plain-text body: at the start of the line that opens the quoted
    history (the earliest marker wins), after the author's text when the reply is bottom-posted
    or interleaved, else the end."""
    end = Placement(len(text), "text:end")
    if bottom:
        return end
    if len(text) > SEARCH_WINDOW:
        found = _find_text(text[:SEARCH_WINDOW])
        if found.rule in _END_RULES:  # nothing placed it inside the window: the end of the whole body
            return Placement(len(text), found.rule, "; ".join(filter(None, (found.doubt, _WINDOW_DOUBT))))
        return found
    return _find_text(text)


def _find_text(text: str) -> Placement:
    end = Placement(len(text), "text:end")
    lined = _lined(text)
    best = _earliest(text, "text", lined)
    q = _line_search(_QUOTE_LINE, lined, best.offset if best else len(text))
    if q is not None:
        quote = Placement(q, "text:quote")
        # An attribution we did not recognise still belongs to the quote: take the non-empty
        # line right above a ">" block if it ends with ":".
        prev_end = text.rfind("\n", 0, max(q - 1, 0))
        prev = text[prev_end + 1:q].strip()
        if not prev and prev_end > 0:  # one blank line between the attribution and the quote
            blank_end = prev_end
            prev_end = text.rfind("\n", 0, max(blank_end - 1, 0))
            prev = text[prev_end + 1:blank_end].strip()
        if (prev.endswith(":") or _ADDRESS_LINE.search(prev)) and prev_end + 1 < q:
            quote = Placement(prev_end + 1, "text:quote")
        best = quote
    if best is None:
        return end if not _history_hint(text) else Placement(len(text), "text:end", "history-like text, no marker")
    if best.rule in ("text:quote", "text:attribution"):
        shape = _quote_shape(text, best.offset, max(best.offset, best.marker_end))
        if shape is not None:
            return Placement(len(text), f"text:{shape}", "" if shape == "bottom-posted" else "interleaved quotes")
    return best


def _quote_shape(text: str, start: int, after: int) -> str | None:
    """"bottom-posted" when nothing but the attribution precedes the quote and the author wrote
    after it; "inline-reply" when the author's text sits between quoted blocks, or both above and
    below the quote; else None (top-posted). A single unquoted line squeezed between two quoted
    lines with no blank line around it is a quoted line that wrapped (a long link), not an answer."""
    new_before = bool(text[:start].strip())
    lines = [ln.strip() for ln in text[after:].split("\n")]  # below the attribution itself
    quoted = [ln.startswith(">") for ln in lines]
    seen_quote, text_after, between = False, False, False
    for i, ln in enumerate(lines):
        if not ln:
            continue
        if seen_quote and not quoted[i] and _FOOTER.match(ln):
            break  # a list footer (Mailman's "____") or a "-- " signature after the quote: not an answer
        if quoted[i]:
            if text_after:
                between = True
            seen_quote = True
        elif seen_quote:
            wrapped = 0 < i < len(lines) - 1 and quoted[i - 1] and quoted[i + 1]
            if not wrapped:
                text_after = True
    if between or (new_before and text_after):
        return "inline-reply"
    if not new_before and text_after:
        return "bottom-posted"
    return None


_FOOTER: Final = re.compile(r"^(?:_{2,}|--)$")  # a line of underscores (list footers) or the "-- " delimiter
_HINT: Final = re.compile(r"wrote:|schrieb|a écrit|^(?:from|von|de)\s?:|-----|^>", re.I | re.M)
# The same search, case-sensitive, on "\n" + text.lower(): every alternative starts with a literal,
# so it runs about 3x faster than the IGNORECASE one (it is run over the whole of every body
# without a history marker: new messages). The two agree except where re.I and str.lower() fold
# differently; for the letters above that is only these three, and a text holding one of them
# takes _HINT (tests/unit/test_placement_regexes.py checks this for every code point).
_HINT_LOWER: Final = re.compile(r"wrote:|schrieb|a écrit|\n(?:from|von|de)\s?:|-----|\n>")
_FOLDS_APART: Final = ("\u0130", "\u0131", "\u017f")  # İ ı ſ: re.I takes them for i, i, s; lower() does not


def _history_hint(text: str) -> bool:
    if any(c in text for c in _FOLDS_APART):
        return _HINT.search(text) is not None
    return _HINT_LOWER.search("\n" + text.lower()) is not None


# --- HTML ------------------------------------------------------------------------------------------

# Structural markers: (rule, literal that must occur for the regex to be worth running, regex on
# the ASCII-lower-cased document).
_CLASS: Final = rb"""<(?:div|blockquote|span)[^>]*\bclass\s*=\s*["']?[^"'>]*\b"""
_HTML_MARKERS: Final = [
    ("html:outlook-web-appendonsend", b"appendonsend",
     re.compile(rb"""<div[^>]*\bid\s*=\s*["']?appendonsend\b""")),
    ("html:outlook-web-hr", b"tabindex", re.compile(rb"""<hr\b[^>]*\btabindex\s*=\s*["']?-1\b[^>]*>""")),
    ("html:outlook-web-divrplyfwdmsg", b"divrplyfwdmsg",
     re.compile(rb"""<div[^>]*\bid\s*=\s*["']?divrplyfwdmsg\b""")),
    # The two patterns with an optional leading element start with the literal "<" written once
    # ("<(?:div>\s*<)?div" rather than "(?:<div>\s*)?<div": the same alternatives in the same
    # order, so the same matches): a pattern that can start with a literal lets the regex engine
    # jump from "<" to "<"; the other form was tried at every byte, 30 times slower than the rest
    # (benchmarks/stamp_ab.py; tests/unit/test_placement_regexes.py checks the two forms agree).
    ("html:outlook-desktop", b"border-top", re.compile(
        rb"<(?:div>\s*<)?div[^>]*border-top\s*:\s*(?:solid\s+#(?:e1e1e1|b5c4df)|#(?:e1e1e1|b5c4df)\s+[\d.]+pt\s+solid)"
        rb"[^>]*>")),
    ("html:outlook-mac", b"olk_src_body_section",
     re.compile(rb"""<span[^>]*\bid\s*=\s*["']?olk_src_body_section\b""")),
    ("html:gmail", b"gmail_quote", re.compile(_CLASS + rb"gmail_quote(?:_container)?\b")),
    ("html:thunderbird-cite", b"moz-cite-prefix", re.compile(_CLASS + rb"moz-cite-prefix\b")),
    ("html:thunderbird-forward", b"moz-forward-container", re.compile(_CLASS + rb"moz-forward-container\b")),
    ("html:yahoo", b"yahoo_quoted", re.compile(rb"""<div[^>]*\b(?:class|id)\s*=\s*["']?[^"'>]*yahoo_quoted""")),
    ("html:gmx-quote", b"name=", re.compile(rb"""<div[^>]*\bname\s*=\s*["']?quote\b""")),
    ("html:zoho", b"zmail_extra", re.compile(_CLASS + rb"zmail_extra\b")),  # Zoho Mail's quote container
    ("html:apple-forward", b"begin forwarded message",
     re.compile(rb"(?:<div[^>]*>\s*)(?:<br[^>]*>\s*)*(?=<div[^>]*>\s*begin forwarded message:)")),
    ("html:apple-cite", b"blockquote",
     re.compile(rb"""<(?:div[^>]*>\s*(?:<br[^>]*>\s*)*<)?blockquote[^>]*\btype\s*=\s*["']?cite\b""")),
    ("html:blockquote-border", b"blockquote",
     re.compile(rb"""<blockquote[^>]*\bstyle\s*=\s*["'][^"']*border""")),
]
_QUOTING_RULES: Final = frozenset({"html:apple-cite", "html:thunderbird-cite", "html:gmail", "html:blockquote-border",
                                   "html:attribution", "html:yahoo"})
_COMMENT: Final = re.compile(rb"<!--.*?-->", re.S)
# Visible-text projection: tags and comments vanish (block-level ones become a line break),
# style/script/head contents are skipped, a few entities become their character.
_TOKEN: Final = re.compile(rb"<!--.*?-->|<(?:style|script|head|title)\b.*?</(?:style|script|head|title)\s*>|<[^>]*>"
                           rb"|&(?:nbsp|#160|amp|lt|gt|quot|#39);|[^<&]+|&", re.S)
_BLOCK_TAG: Final = re.compile(rb"</?(?:div|p|br|tr|li|ul|ol|table|blockquote|hr|h[1-6]|pre|center|dl|dt|dd)\b")
_ENTITIES: Final = {b"&nbsp;": b" ", b"&#160;": b" ", b"&amp;": b"&", b"&lt;": b"<", b"&gt;": b">",
                    b"&quot;": b'"', b"&#39;": b"'"}
# An opening tag, and the line breaks that open the element before its text (iCloud writes
# "<div><br>2019年7月2日 … 写道：", Outlook "<p><br>From: …"): the signature goes in front of it all.
_OPEN_TAG: Final = re.compile(
    rb"<(div|p|span|font|b|strong|i|em|u|o:p|table|tbody|tr|td|center|blockquote|a)\b[^>]*>(?:\s*<br\s*/?>)*\s*$")


def _comment_spans(lower: bytes) -> list[tuple[int, int]]:
    return [m.span() for m in _COMMENT.finditer(lower)]


def _in_spans(pos: int, spans: list[tuple[int, int]]) -> bool:
    return any(a <= pos < b for a, b in spans)


def find_html(html: str, *, bottom: bool = False, utf8: bytes | None = None, textual: bool = True) -> Placement:
    """Insertion offset in an HTML body (see the module doc for the rules).

    Markup is ASCII, so the search runs on the UTF-8 bytes lower-cased with ``bytes.lower()``
    (fast, length-preserving); only the final offset is converted back to characters. ``utf8``
    is ``html`` already encoded as UTF-8, when the caller has it (a UTF-8 leaf's decoded bytes).
    ``textual=False`` skips the visible-text search (the caller knows there is no textual marker)."""
    raw = utf8 if utf8 is not None else html.encode("utf-8", "surrogatepass")  # the caller may have it
    lower = raw.lower()
    spans = _comment_spans(lower) if wire.find(lower, b"<!--") >= 0 else []
    if len(lower) > SEARCH_WINDOW and not bottom:
        window = lower[:SEARCH_WINDOW]
        found = _find_html_bytes(window, [sp for sp in spans if sp[0] < SEARCH_WINDOW], bottom, textual)
        if found.rule in _END_RULES:  # nothing placed it inside the window: the end of the whole document
            last = _document_end(lower, spans)
            doubt = "; ".join(filter(None, (found.doubt, _WINDOW_DOUBT)))
            found = Placement(last.offset, found.rule if found.rule.endswith(("bottom-posted", "inline-reply"))
                              else last.rule, doubt)
    else:
        found = _find_html_bytes(lower, spans, bottom, textual)
    offset = len(raw[:found.offset].decode("utf-8", "surrogatepass"))
    return Placement(offset, found.rule, found.doubt)


# Needles that share a rarer piece are searched only when it is there: one scan for "_" instead
# of four for a document without any underscore, one for "moz-" instead of two.
_GATES: Final = {b"gmail_quote": b"_", b"yahoo_quoted": b"_", b"zmail_extra": b"_", b"olk_src_body_section": b"_",
                 b"moz-cite-prefix": b"moz-", b"moz-forward-container": b"moz-"}


def _present(lower: bytes, needle: bytes, seen: dict[bytes, bool]) -> bool:
    hit = seen.get(needle)
    if hit is None:
        hit = seen[needle] = wire.find(lower, needle) >= 0  # not `in`: see wire.FIND
    return hit


def _structural(lower: bytes, spans: list[tuple[int, int]], skip: str = "") -> Placement | None:
    best: Placement | None = None
    present: dict[bytes, bool] = {}  # each needle searched once (a 10 KB "in" costs 2-7 µs)
    for rule, needle, rx in _HTML_MARKERS:
        if rule == skip:
            continue
        gate = _GATES.get(needle)
        if (gate is not None and not _present(lower, gate, present)) or not _present(lower, needle, present):
            continue
        for m in rx.finditer(lower, 0, best.offset if best else len(lower)):
            if not _in_spans(m.start(), spans):
                if best is None or m.start() < best.offset:
                    best = Placement(m.start(), rule)
                break
    if best is not None and best.rule == "html:outlook-web-appendonsend":
        # Outlook on the web leaves an empty <div id="appendonsend"> where its compose area ended;
        # text typed or pasted below it (and above the <hr>/divRplyFwdMsg header) is still the
        # newest text, so the history starts at the next marker then.
        rest = _structural(lower, spans, skip=best.rule)
        if rest is not None and _has_text(lower[best.offset:rest.offset]):
            return rest
    return best


def _body_start(lower: bytes) -> int:
    i = lower.find(b"<body")
    return lower.find(b">", i) + 1 if i >= 0 else 0


def _project(lower: bytes, start: int, end: int) -> tuple[str, list[int], list[int]]:
    """Visible text of ``lower[start:end]`` and a map back: text index → byte offset.

    The tokens come from one ``findall`` (no match object each) of :data:`_TOKENS`, which also
    takes a lone "<" as a token, so they cover the range end to end and each one's offset is the
    sum of the lengths before it; a lone "<" shows nothing, as when it was skipped. Whether a tag
    is a line break is remembered per short tag (Outlook repeats a few dozen). About 5x faster
    than a finditer loop over the same tokens (tests/unit/test_placement_regexes.py compares)."""
    chunks: list[bytes] = []
    tpos: list[int] = []  # text offset (in bytes of the joined projection) where each chunk starts
    bpos: list[int] = []  # byte offset in ``lower`` of that chunk
    n, pos = 0, start
    breaks, entities = _BREAKS, _ENTITIES
    for tok in _TOKENS.findall(lower, start, end):
        size = len(tok)
        if tok[0] == 0x3C:  # "<": a tag, comment, skipped block or lone "<"
            brk = breaks.get(tok)
            if brk is None:
                brk = _BLOCK_TAG.match(tok) is not None
                if size <= _BREAKS_TAG and len(breaks) < _BREAKS_KEPT:
                    breaks[tok] = brk
            if brk:
                chunks.append(b"\n")
                tpos.append(n)
                bpos.append(pos)
                n += 1
        else:
            piece = entities.get(tok, tok)
            chunks.append(piece)
            tpos.append(n)
            bpos.append(pos)
            n += len(piece)
        pos += size
    return b"".join(chunks).decode("utf-8", "replace"), tpos, bpos


# _TOKEN with a lone "<" as a last alternative: the tokens then cover the whole range (see _project).
_TOKENS: Final = re.compile(_TOKEN.pattern + rb"|<", re.S)
# Whether a tag (at most _BREAKS_TAG bytes) is a line break in the projection; bounded, as the tags
# are the sender's to choose.
_BREAKS: dict[bytes, bool] = {}
_BREAKS_TAG: Final = 200
_BREAKS_KEPT: Final = 4096


def _textual(lower: bytes, start: int, end: int) -> Placement | None:
    """The earliest textual history marker in the visible text of ``lower[start:end]``."""
    text, tpos, bpos = _project(lower, start, end)
    found = _earliest(text, "html")
    if found is None:
        return None
    # The text index counts characters of the decoded projection; map it back through bytes.
    byte_index = len(text[:found.offset].encode("utf-8", "replace"))
    k = bisect.bisect_right(tpos, byte_index) - 1
    if k < 0:
        return None
    pos = bpos[k] + (byte_index - tpos[k] if lower[bpos[k]:bpos[k] + 1] not in (b"<", b"&") else 0)
    return Placement(_back_over_open_tags(lower, pos), found.rule)


def _back_over_open_tags(lower: bytes, pos: int) -> int:
    """Move ``pos`` back over white space and the opening tags right before it, so the signature
    goes in front of the element that holds the marker line, not inside it."""
    while True:
        m = _OPEN_TAG.search(lower, max(0, pos - 400), pos)
        if m is None:
            return pos
        pos = m.start()


def _find_html_bytes(lower: bytes, spans: list[tuple[int, int]], bottom: bool, textual: bool) -> Placement:
    if not bottom:
        best = _structural(lower, spans)
        body = _body_start(lower)
        limit = best.offset if best is not None else len(lower)
        if textual and limit > body:
            found = _textual(lower, body, limit)
            if found is not None and (best is None or found.offset < best.offset):
                best = found
        if best is not None:
            if best.rule in _QUOTING_RULES:
                shape, history = _html_quote_shape(lower, body, best.offset)
                if history is not None:
                    return history
                if shape is not None:
                    end = _document_end(lower, spans)
                    return Placement(end.offset, f"html:{shape}", "" if shape == "bottom-posted" else
                                     "interleaved quotes")
            return best
    return _document_end(lower, spans)


def _document_end(lower: bytes, spans: list[tuple[int, int]]) -> Placement:
    for rule, tag in (("html:body-end", b"</body"), ("html:html-end", b"</html")):
        pos = len(lower)
        while True:
            pos = lower.rfind(tag, 0, pos)
            if pos < 0 or not _in_spans(pos, spans):
                break
        if pos >= 0:
            return Placement(pos, rule)
    return Placement(len(lower), "html:end")


_VISIBLE: Final = re.compile(
    rb"<!--.*?-->|<(?:style|script)\b.*?</(?:style|script)\s*>|<[^>]*>|&nbsp;|&#160;|\s+", re.S)
_BQ: Final = re.compile(rb"<(/?)blockquote\b[^>]*>")


def _has_text(fragment: bytes) -> bool:
    return bool(_VISIBLE.sub(b"", fragment))


def _answers(fragment: bytes) -> bool:
    """Text below the quote that is an answer: not the sender's own "-- " signature (RFC 3676
    §4.3; old Gmail puts ``-- <div class="gmail_signature">`` under the quote) or a list footer."""
    text = _VISIBLE.sub(b"", fragment)
    return bool(text) and not text.startswith((b"--", b"__"))


def _html_quote_shape(lower: bytes, body: int, first: int) -> tuple[str | None, Placement | None]:
    """Bottom-posted / interleaved detection for HTML quoting with ``<blockquote>``.

    The second item is set when the text between two quotes is itself a history marker (an
    attribution or "Original Message" line) and nothing answers below the last quote: the author
    pasted a quote into the newest text (iCloud and ProtonMail webmail do this), and the history
    starts at that marker, not at the first quote."""
    spans: list[tuple[int, int]] = []  # top-level blockquote spans from the first marker on
    depth, open_at = 0, 0
    for m in _BQ.finditer(lower, first):
        if not m.group(1):
            if depth == 0:
                open_at = m.start()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                spans.append((open_at, m.end()))
    if not spans:
        return None, None
    end = _document_end(lower, []).offset
    before = _has_text(lower[body:first])
    after = _answers(lower[spans[-1][1]:end])
    gaps = [(a[1], b[0]) for a, b in itertools.pairwise(spans) if _has_text(lower[a[1]:b[0]])]
    if gaps and not after:
        for a, b in gaps:
            marker = _textual(lower, a, b)
            if marker is not None:
                return None, marker
    if gaps or (before and after):
        return "inline-reply", None
    if not before and after:
        return "bottom-posted", None
    return None, None
