"""Issue #9 placement classes: one minimal synthetic example per class (the real samples are in
tests/data/replies/, replayed by test_reply_corpus.py). Each case names the rule and the text the
signature must land in front of; the newest text must stay above it."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.mime import codec, placement, scanner
from relay.mime.classify import find_targets

NEW = "NEWEST"

HTML_CASES = [
    # (id, html, rule, the markup the signature must be inserted in front of)
    ("aol-original-in-div",
     f"<div>{NEW}</div><div><br></div><div>-----Original Message-----<br>From: Bob</div>",
     "html:original-message", "<div>-----Original"),
    ("samsung-original",
     f"<div>{NEW}</div><div><br></div><div>-------- Original message --------</div><div>From: Bob</div>",
     "html:original-message", "<div>-------- Original"),
    ("outlook-express",
     f'<DIV>{NEW}</DIV><BLOCKQUOTE style="PADDING-RIGHT: 0px; BORDER-LEFT: #000000 2px solid; MARGIN-RIGHT: 0px">'
     '<DIV style="FONT: 10pt arial">----- Original Message ----- </DIV></BLOCKQUOTE>',
     "html:blockquote-border", "<BLOCKQUOTE"),
    ("outlook-express-no-quote",
     f'<DIV>{NEW}</DIV><DIV style="FONT: 10pt arial">----- Original Message ----- </DIV><DIV>From: Bob</DIV>',
     "html:original-message", '<DIV style="FONT: 10pt arial">-----'),
    ("yahoo-classic",
     f"<div>{NEW}</div><br><br>--- On <b>Mon, 1/3/25, Bob Kelly <i>&lt;bob@x&gt;</i></b> wrote:<br>"
     '<blockquote style="border-left: 2px solid rgb(16, 16, 255); margin-left: 5px;">old</blockquote>',
     "html:attribution", "--- On"),
    ("yahoo-ydp-prefix",
     f'<div>{NEW}</div><div id="ydp3a2yahoo_quoted_8921" class="ydp3a2yahoo_quoted"><div>On Friday, Bob wrote:</div>'
     "</div>", "html:yahoo", '<div id="ydp3a2yahoo'),
    ("attribution-bare-blockquote",
     f"<div>{NEW}</div><div>On Mon, Jan 6, 2025 at 9:12 AM Bob Kelly &lt;bob@x&gt; wrote:</div>"
     '<blockquote style="margin:0 0 0 .8ex;border-left:1px #ccc solid;padding-left:1ex">old</blockquote>',
     "html:attribution", "<div>On Mon"),
    ("gmail-blockquote-without-div",
     f'<div>{NEW}</div><br>On Mon, Jan 6, 2025, Bob Kelly &lt;<a href="mailto:bob@x">bob@x</a>&gt; wrote:<br>'
     '<blockquote class="gmail_quote" style="margin:0 0 0 .8ex">old</blockquote>',
     "html:attribution", "On Mon"),
    ("gmail-quote-on-blockquote-only",
     f'<div>{NEW}</div><blockquote class="gmail_quote" style="margin:0 0 0 .8ex">old</blockquote>',
     "html:gmail", "<blockquote"),
    ("ios-attribution-outside-cite",
     f'<div dir="ltr">{NEW}</div><div dir="ltr"><br><div dir="ltr">On 3 Jan 2025, at 16:01, Bob Kelly '
     '&lt;bob@x&gt; wrote:</div><blockquote type="cite"><div dir="ltr">old</div></blockquote></div>',
     "html:attribution", '<div dir="ltr"><br><div dir="ltr">On 3 Jan'),  # in front of the block with the line break
    ("roundcube",
     f'<p>{NEW}</p><p>On 2025-01-03 16:01, Bob Kelly wrote:</p><blockquote type="cite" style="padding: 0 0.4em; '
     'border-left: #1010ff 2px solid; margin: 0">old</blockquote>', "html:attribution", "<p>On 2025"),
    ("fastmail",
     f'<div>{NEW}</div><div><br></div><div>On Fri, 3 Jan 2025, at 16:01, Bob Kelly wrote:</div>'
     '<blockquote type="cite" id="qt">old</blockquote>', "html:attribution", "<div>On Fri"),
    ("outlook-mac",
     f'<div>{NEW}</div><div><br></div><span id="OLK_SRC_BODY_SECTION"><div style="font-family:Calibri; '
     'BORDER-BOTTOM: medium none; BORDER-TOP: #b5c4df 1pt solid; PADDING-TOP: 3pt"><span style="font-weight:bold">'
     'From: </span>Bob<br><span style="font-weight:bold">Date: </span>Friday</div>'
     "<div>-----Original Message-----</div></span>", "html:outlook-mac", '<span id="OLK_SRC'),
    ("outlook-mac-border-only",
     f'<div>{NEW}</div><div style="BORDER-TOP: #b5c4df 1pt solid; PADDING-TOP: 3pt"><b>From: </b>Bob</div>',
     "html:outlook-desktop", '<div style="BORDER-TOP'),
    ("gmx-gesendet-before-von",
     f'<div>{NEW}</div><div name="quote" style="margin:10px 5px 5px 10px; border-left:2px solid #C3D9E5;">'
     '<div style="margin:0 0 10px 0;"><b>Gesendet:</b>&nbsp;Freitag, 03. Januar 2025<br/><b>Von:</b>&nbsp;Bob'
     "</div></div>", "html:gmx-quote", '<div name="quote"'),
    ("header-block-any-order",
     f"<p>{NEW}</p><p><b>Sent:</b> Friday<br><b>From:</b> Bob<br><b>To:</b> Alice</p>",
     "html:header-block", "<p><b>Sent"),
    ("zoho-zmail-extra",
     f'<div>{NEW}</div><div class="zmail_extra"><blockquote style="border-left: 1px solid rgb(204, 204, 204)">old'
     '</blockquote></div>', "html:zoho", '<div class="zmail_extra"'),
    ("zoho-zh-attribution",
     f"<div>{NEW}</div><div>---- 在 星期二, 02 七月 2019 17:55:32 +0800 <b>Bob &lt;bob@x&gt;</b> 撰写 ----<br></div>"
     "<blockquote>old</blockquote>", "html:attribution", "<div>---- 在"),
    ("outlook-web-text-below-appendonsend",
     f'<div>{NEW}</div><div id="appendonsend"></div><div>PASTED</div><hr tabindex="-1" style="display:inline-block">'
     '<div id="divRplyFwdMsg"><b>From:</b> Bob</div>', "html:outlook-web-hr", "<hr tabindex"),
    ("outlook-web-empty-appendonsend",
     f'<div>{NEW}</div><div id="appendonsend"></div><hr tabindex="-1" style="display:inline-block">'
     '<div id="divRplyFwdMsg"><b>From:</b> Bob</div>', "html:outlook-web-appendonsend", '<div id="appendonsend"'),
    ("pasted-quote-then-attribution",  # iCloud webmail: a quote pasted into the newest text
     f'<div>{NEW}</div><blockquote type="cite">pasted</blockquote><div>2019年7月2日 上午2:59，Bob &lt;bob@x&gt; 写道：'
     '</div><blockquote type="cite">old</blockquote>', "html:attribution", "<div>2019年"),
    ("protonmail-unicode-hyphens",
     f'<div>{NEW}</div><blockquote class="protonmail_quote" type="cite">pasted</blockquote>'
     '<div class="protonmail_signature_block">Sent with ProtonMail</div>'
     "<div>‐‐‐‐‐‐‐ Original Message ‐‐‐‐‐‐‐<br></div>"
     '<div> 星期二, 七月 2, 2019 6:09 晚上，Bob &lt;bob@x&gt; 来信：<br></div><blockquote class="protonmail_quote" '
     'type="cite">old</blockquote>', "html:original-message", "<div>‐"),
    ("icloud-line-break-before-attribution",
     f"<div>{NEW}</div><div><br>2019年7月2日 上午2:59，Bob &lt;bob@x&gt; 写道：<br></div>"
     '<div><blockquote type="cite">old</blockquote></div>', "html:attribution", "<div><br>2019"),
    ("line-break-after-text-stays",  # a <br> after the newest text is not an element's opening
     f'<p>{NEW}<br>On Mon, Jan 6, 2025, Bob wrote:</p><blockquote type="cite">old</blockquote>',
     "html:attribution", "On Mon"),
    ("first-marker-in-document-order-wins",
     f'<div>{NEW}</div><div class="gmail_quote"><div>On Mon, Bob wrote:</div><blockquote type="cite">'
     '<div style="border-top:solid #E1E1E1 1.0pt">From: Carol</div></blockquote></div>',
     "html:gmail", '<div class="gmail_quote"'),
]


@pytest.mark.parametrize(("html", "rule", "before"), [c[1:] for c in HTML_CASES], ids=[c[0] for c in HTML_CASES])
def test_html_placement_classes(html: str, rule: str, before: str) -> None:
    where = placement.find_html(f"<html><body>{html}</body></html>")
    doc = f"<html><body>{html}</body></html>"
    assert where.rule == rule, where
    assert doc[where.offset:].startswith(before), doc[where.offset:where.offset + 60]
    assert NEW in doc[:where.offset]


TEXT_CASES = [
    # (id, text, rule, the text the signature goes in front of)
    ("gmail-wrapped-attribution",
     f"{NEW}\n\nOn Fri, Jan 3, 2025 at 4:01 PM Bob Kelly <\nbob.kelly@fabrikam.example> wrote:\n\n> old\n",
     "text:attribution", "On Fri"),
    ("android-attribution-three-lines",
     f"{NEW}\n\nOn Fri, 3 Jan 2025, 16:01 Bob Kelly Longname-Surname,\n<bob.kelly@fabrikam.example>\nwrote:\n> old\n",
     "text:attribution", "On Fri"),
    ("attribution-across-blank-line",
     f"{NEW}\n\nOn Fri, Jan 3, 2025 at 4:01 PM Bob Kelly\n\n<bob@x> wrote:\n> old\n", "text:attribution", "On Fri"),
    ("gmail-bold-header", f"{NEW}\n\n*From:* Bob Kelly <bob@x>\n*Sent:* Friday, January 3, 2025 4:01 PM\n*To:* A\n",
     "text:header-block", "*From:*"),
    ("old-gmail-iso-date", f"{NEW}\n\n2017-11-24 16:32 GMT+01:00 Bob Kelly <bob@x>:\n\n> old\n",
     "text:attribution", "2017-11-24"),
    ("hotmail-fr", f"{NEW}\n\nDe : Bob Kelly <bob@x>\nEnvoyé le : vendredi 3 janvier 2025 16:01\nÀ : Alice\n",
     "text:header-block", "De :"),
    ("gmx-sent-before-from", f"{NEW}\n\nGesendet: Freitag, 03. Januar 2025 um 16:01 Uhr\nVon: Bob\nAn: Alice\n",
     "text:header-block", "Gesendet:"),
    ("zoho", f"{NEW}\n\n---- On Fri, 03 Jan 2025 16:01:00 +0100 Bob Kelly <bob@x> wrote ----\n\nold\n",
     "text:attribution", "---- On"),
    ("samsung-plain", f"{NEW}\n\n-------- Original message --------\nFrom: Bob\nDate: 03/01/2025\n",
     "text:original-message", "-------- Original"),
    ("outlook-express-plain", f"{NEW}\n\n----- Original Message -----\nFrom: Bob\n",
     "text:original-message", "----- Original"),
    ("da", f"{NEW}\n\nDen 3. jan. 2025 kl. 16.01 skrev Bob Kelly <bob@x>:\n\n> gammel\n", "text:attribution", "Den 3."),
    ("sv", f"{NEW}\n\nDen 3 jan. 2025 kl. 16:01 skrev Bob Kelly <bob@x>:\n> gammal\n", "text:attribution", "Den 3 jan"),
    ("no", f"{NEW}\n\nfre. 3. jan. 2025 kl. 16:01 skrev Bob Kelly <bob@x>:\n> gammel\n", "text:attribution", "fre. 3."),
    ("no-colon-next-line", f"{NEW}\n\nfre. 3. jan. 2025 kl. 16:01 skrev Bob Kelly\n<bob@x>:\n> gammel\n",
     "text:attribution", "fre. 3."),
    ("fi", f"{NEW}\n\npe 3.1.2025 klo 16.01 Bob Kelly <bob@x> kirjoitti:\n> vanha\n", "text:attribution", "pe 3.1."),
    ("ru", f"{NEW}\n\n3 января 2025 г., 16:01 пользователь Bob Kelly <bob@x> написал:\n> старое\n",
     "text:attribution", "3 января"),
    ("ru-headers", f"{NEW}\n\nОт: Bob Kelly\nОтправлено: 3 января 2025 г. 16:01\nКому: Alice\n",
     "text:header-block", "От:"),
    ("uk", f"{NEW}\n\nпт, 3 січ. 2025 о 16:01 Bob Kelly <bob@x> пише:\n> старе\n", "text:attribution", "пт, 3 січ"),
    ("zh-gmail", f"{NEW}\n\nBob Kelly <bob@x> 于2025年1月3日周五 16:01写道：\n> 旧\n", "text:attribution",
     "Bob Kelly <bob@x> 于"),
    ("zh-headers", f"{NEW}\n\n发件人: Bob Kelly\n发送时间: 2025年1月3日 16:01\n收件人: Alice\n", "text:header-block",
     "发件人"),
    ("ja-gmail", f"{NEW}\n\n2025年1月3日(金) 16:01 Bob Kelly <bob@x>:\n> 古い\n", "text:attribution", "2025年1月3日"),
    ("ja-headers", f"{NEW}\n\n差出人: Bob Kelly\n送信日時: 2025年1月3日 16:01\n", "text:header-block", "差出人"),
    ("cs", f"{NEW}\n\npá 3. 1. 2025 v 16:01 odesílatel Bob Kelly <bob@x> napsal:\n> staré\n", "text:attribution",
     "pá 3."),
    ("cs-gmail-wrapped", f"{NEW}\n\nDne pá 3. led. 2025 16:01 Bob Kelly <bob@x>\nnapsal(a):\n\n> staré\n",
     "text:attribution", "Dne pá 3."),
    ("tr", f"{NEW}\n\nBob Kelly <bob@x>, 3 Oca 2025 Cum, 16:01 tarihinde şunu yazdı:\n> eski\n", "text:attribution",
     "Bob Kelly <bob@x>, 3 Oca"),
    ("tr-gmail-date-first", f"{NEW}\n\n5 Oca 2025 Pzt 10:12 tarihinde Bob Kelly <bob@x> şunu yazdı:\n> eski\n",
     "text:attribution", "5 Oca"),
    ("tr-outlook-2019", f'{NEW}\n\n"Bob Kelly" <bob@x>, 28/10/2021 12:46 tarihinde şunu yazdı:\n\n    eski\n',
     "text:attribution", '"Bob Kelly"'),
    ("no-outlook-2019", f"{NEW}\n\nBob Kelly <bob@x> skrev følgende den 28/10/2021, 12:46:\n\n    gammel\n",
     "text:attribution", "Bob Kelly <bob@x> skrev"),
    ("uk-evolution", f"{NEW}\n\nУ пн, 2023-10-09 у 14:29 -0700, Bob Kelly пише:\n> старе\n", "text:attribution",
     "У пн"),
    ("yahoo-forward-header-on-one-line",
     f"{NEW}\n  ----- Forwarded Message ----- From: Bob <bob@x>To: Alice <a@x>Sent: Tuesday\nold\n",
     "text:forwarded", "  ----- Forwarded"),
    ("yahoo-original-header-on-one-line", f"{NEW}\n\n----- Original Message ----- From: Bob\nold\n",
     "text:original-message", "----- Original"),
    ("pl-dnia", f"{NEW}\n\nDnia 3.01.2025 o 16:01 Bob Kelly <bob@x> napisał(a):\n> stare\n", "text:attribution",
     "Dnia 3.01"),
    ("hu", f"{NEW}\n\nBob Kelly <bob@x> ezt írta (időpont: 2025. jan. 3., P, 16:01):\n> régi\n",
     "text:attribution", "Bob Kelly"),
]
FORWARDED = ["---------- Forwarded message ---------", "---------- Weitergeleitete Nachricht ----------",
             "-------- Message transféré --------", "---------- Mensaje reenviado ---------",
             "---------- Messaggio inoltrato ---------", "---------- Doorgestuurd bericht ---------",
             "---------- Wiadomość przekazana dalej ---------", "---------- Mensagem encaminhada ---------",
             "---------- Videresendt meddelelse ----------", "---------- Vidarebefordrat meddelande ----------",
             "---------- Välitetty viesti ----------", "---------- Пересылаемое сообщение ---------",
             "---------- Переслане повідомлення ---------", "---------- 转发的邮件 ---------",
             "---------- 転送メッセージ ---------", "---------- Přeposlaná zpráva ---------",
             "---------- İletilen mesaj ---------", "-------- İletilen İleti --------",
             "----- Перенаправлене повідомлення -----", "----- Videresendt melding -----",
             "İleti başlangıcı:", "Videresendt melding:", "Begin forwarded message:",
             "Anfang der weitergeleiteten Nachricht:", "Début du message réexpédié :"]
TEXT_CASES += [(f"forwarded-{i}", f"{NEW}\n\n{m}\nFrom: Bob\n", "text:forwarded", m) for i, m in enumerate(FORWARDED)]


@pytest.mark.parametrize(("text", "rule", "before"), [c[1:] for c in TEXT_CASES], ids=[c[0] for c in TEXT_CASES])
def test_text_placement_classes(text: str, rule: str, before: str) -> None:
    where = placement.find_text(text)
    assert where.rule == rule, where
    assert text[where.offset:].startswith(before), text[where.offset:where.offset + 40]
    assert NEW in text[:where.offset]


def test_bottom_posted_text_goes_after_the_authors_text() -> None:
    text = f"On Fri, Jan 3, 2025 at 4:01 PM Bob wrote:\n> question?\n> more\n\n{NEW} answer here.\n"
    where = placement.find_text(text)
    assert (where.rule, where.offset, where.doubt) == ("text:bottom-posted", len(text), "")


def test_bottom_posted_html_goes_before_body_end() -> None:
    html = (f'<html><body><div class="moz-cite-prefix">On 03/01/2025 16:01, Bob wrote:<br></div>'
            f'<blockquote type="cite">question?</blockquote><p>{NEW} answer</p></body></html>')
    where = placement.find_html(html)
    assert where.rule == "html:bottom-posted" and html[where.offset:].startswith("</body>")


def test_own_signature_under_an_html_quote_is_not_an_answer() -> None:
    """Old Gmail (gmail_extra) puts the sender's "-- " signature below the quote; the reply is still
    top-posted, so the signature goes above the attribution, not to the end as for an inline reply."""
    html = (f'<html><body><div dir="ltr">{NEW}</div><div class="gmail_extra"><div class="gmail_quote">'
            'On Wed, Mar 16, 2016 at 12:49 AM, Bob wrote:<br><blockquote class="gmail_quote">old</blockquote>'
            '</div>-- <br><div class="gmail_signature">Alice</div></div></body></html>')
    where = placement.find_html(html)
    assert where.rule == "html:gmail" and html[where.offset:].startswith('<div class="gmail_quote">'), where


def test_interleaved_replies_go_at_the_end_and_say_so() -> None:
    text = f"Hi Bob,\n\n> question one\n{NEW} answer one\n\n> question two\nanswer two\n"
    where = placement.find_text(text)
    assert (where.rule, where.offset) == ("text:inline-reply", len(text)) and where.doubt
    html = ('<html><body><p>Hi</p><blockquote type="cite">q1</blockquote><p>a1</p>'
            '<blockquote type="cite">q2</blockquote><p>a2</p></body></html>')
    h = placement.find_html(html)
    assert h.rule == "html:inline-reply" and html[h.offset:].startswith("</body>") and h.doubt


def test_an_answer_below_the_last_quote_keeps_an_attribution_between_quotes_interleaved() -> None:
    """The pasted-quote rule only applies when nothing answers below the last quote."""
    html = ('<html><body><p>Hi</p><blockquote type="cite">q1</blockquote><div>On Mon, Bob wrote:</div>'
            '<blockquote type="cite">q2</blockquote><p>my answer</p></body></html>')
    assert placement.find_html(html).rule == "html:inline-reply"


def test_top_posted_reply_with_quoted_history_is_not_bottom_posted() -> None:
    text = f"{NEW}\n\nOn Fri, Bob wrote:\n> q\n> > older\n> q2\n"
    assert placement.find_text(text).rule == "text:attribution"


def test_quoted_text_inside_outlook_history_is_not_an_inline_reply() -> None:
    text = f"{NEW}\n\nFrom: Bob\nSent: Friday\n\nhi\n> earlier\nmiddle\n> earlier2\n"
    assert placement.find_text(text).rule == "text:header-block"


def test_a_history_hint_without_a_marker_is_flagged() -> None:
    where = placement.find_text("Hello\nBob wrote something: see below\n-----\nstuff\n")
    assert where.rule == "text:end" and where.doubt


# Issue #9 "every placement class has a real sample": the class, then real messages from
# tests/data/replies/ (sources and licences in manifest.toml / manual.toml) with the leaf and the
# rule the class must produce on them. The corpus test checks where the signature lands in them;
# this checks each one is placed *by that class*, so a class cannot pass on a real sample only
# because some other rule happened to fire. Classes without a permissively licensed real sample
# are listed in tests/data/replies/README.md ("Gaps") and in the issue note.
REAL_SAMPLES: dict[str, list[tuple[str, str, str]]] = {
    "Original Message in a <div> (AOL web, QQ, Sina)": [
        ("manual/felixfw-aol.eml", "html", "html:original-message"),
        ("talon-clients/aol.eml", "html", "html:original-message"),
        ("manual/felixfw-tencent.eml", "html", "html:original-message"),
        ("manual/felixfw-sina.eml", "html", "html:original-message"),
    ],
    "Samsung Email '-------- Original message --------' (its FR and DA forms)": [
        ("manual/crisp-french-dash.eml", "plain", "text:original-message"),
        ("manual/crisp-danish-dash.eml", "plain", "text:original-message"),
    ],
    "Outlook desktop and Office 365 HTML header blocks": [
        ("manual/planer-microsoft-namespaces.eml", "html", "html:header-block"),
        ("manual/planer-office-365.eml", "html", "html:outlook-web-hr"),
    ],
    "----- Original Message ----- in plain text (Outlook Express style; Yahoo, Comcast)": [
        ("talon-clients/yahoo.eml", "plain", "text:original-message"),
        ("talon-clients/comcast.eml", "plain", "text:original-message"),
    ],
    "Yahoo yahoo_quoted, with and without the ydp prefix": [
        ("manual/quotequail-yahoo-ydp.eml", "html", "html:yahoo"),
        ("manual/felixfw-yahoo.eml", "html", "html:yahoo"),
    ],
    "attribution followed by a bare or bordered <blockquote> (Yandex, NetEase)": [
        ("manual/felixfw-yandex.eml", "html", "html:attribution"),
        ("manual/felixfw-netease.eml", "html", "html:attribution"),
    ],
    "Gmail blockquote.gmail_quote without div.gmail_quote": [
        ("talon-html/gmail_quote_blockquote.eml", "html", "html:gmail"),
    ],
    "attribution outside <blockquote type=cite> (iOS Mail, iCloud)": [
        ("manual/quotequail-ios-reply-outside-cite.eml", "html", "html:attribution"),
        ("manual/felixfw-icloud.eml", "html", "html:attribution"),
    ],
    "Outlook for Mac OLK_SRC_BODY_SECTION": [
        ("talon-clients/html-OLK_SRC_BODY_SECTION.eml", "html", "html:outlook-mac"),
    ],
    "GMX/web.de <div name=quote> with Sent: before From:": [("manual/felixfw-gmx.eml", "html", "html:gmx-quote")],
    "Zoho (zmail_extra, '---- On … wrote ----')": [
        ("manual/felixfw-zoho.eml", "html", "html:zoho"),
        ("manual/crisp-zoho.eml", "plain", "text:attribution"),
    ],
    "Outlook on the web (appendonsend, <hr tabindex=-1>)": [
        ("manual/felixfw-outlook.eml", "html", "html:outlook-web-hr"),
    ],
    "ProtonMail (U+2010 Original Message after a pasted quote)": [
        ("manual/felixfw-proton.eml", "html", "html:original-message"),
    ],
    "plain attribution wrapped over lines (Gmail)": [
        ("manual/crisp-gmail-split-from.eml", "plain", "text:attribution"),
    ],
    "Gmail *From:* … *Sent:*": [("talon-text/036-bold_from_block.eml", "plain", "text:header-block")],
    "old Gmail 2017-11-24 16:32 GMT+01:00 Name <addr>:": [("manual/crisp-23.eml", "plain", "text:attribution")],
    "Hotmail FR De : … Envoyé le :": [("manual/willdurand-10-hotmail-fr.eml", "plain", "text:header-block")],
    "forwarded-message markers": [
        ("talon-text/038-dont_parse_quotations_for_forwarded.eml", "plain", "text:forwarded"),
    ],
    "attribution DA": [("manual/github-gmail-danish.eml", "plain", "text:attribution")],
    "attribution SV": [("manual/alfonsrv-sv-gmail.eml", "plain", "text:attribution")],
    "attribution FI": [("manual/crisp-finnish.eml", "plain", "text:attribution")],
    "attribution RU": [("manual/crisp-russian.eml", "plain", "text:attribution")],
    "attribution ZH": [("manual/zapier-chinese-gmail.eml", "plain", "text:attribution")],
    "attribution JA": [("manual/alfonsrv-ja-quoted.eml", "plain", "text:attribution")],
    "attribution CS": [("manual/alfonsrv-cs-wrapped.eml", "plain", "text:attribution")],
    "attribution PL": [("manual/willdurand-16-pl-dnia.eml", "plain", "text:attribution")],
    "attribution HU": [("manual/alfonsrv-hu-gmail.eml", "plain", "text:attribution")],
    "attribution NO": [("manual/crisp-fwd-outlook-2019-no.eml", "plain", "text:attribution")],
    "attribution TR": [("manual/crisp-fwd-outlook-2019-tr.eml", "plain", "text:attribution")],
    "forwarded markers in UK, TR, NO (Thunderbird, Yahoo's one-line header)": [
        ("manual/crisp-fwd-thunderbird-uk.eml", "plain", "text:forwarded"),
        ("manual/crisp-fwd-thunderbird-tr.eml", "plain", "text:forwarded"),
        ("manual/crisp-fwd-yahoo-uk.eml", "plain", "text:forwarded"),
        ("manual/crisp-fwd-yahoo-no.eml", "plain", "text:forwarded"),
        ("manual/crisp-fwd-yahoo-en-alt-2.eml", "plain", "text:forwarded"),
    ],
    "bottom-posted reply": [
        ("talon-text/011-reply_after_quotations.eml", "plain", "text:bottom-posted"),
        ("talon-clients/thunderbird.eml", "plain", "text:bottom-posted"),
    ],
    "interleaved reply": [("talon-text/013-reply_wraps_quotations.eml", "plain", "text:inline-reply")],
}


@pytest.mark.parametrize(("cls", "file", "leaf", "rule"),
                         [(c, *s) for c, samples in REAL_SAMPLES.items() for s in samples],
                         ids=[f"{c[:40]}:{s[0]}" for c, samples in REAL_SAMPLES.items() for s in samples])
def test_every_placement_class_has_a_real_sample(cls: str, file: str, leaf: str, rule: str) -> None:
    root = Path(__file__).resolve().parents[1] / "data" / "replies"
    s = scanner.scan((root / file).read_bytes())
    part = find_targets(s)[leaf]
    text = codec.decode_text(codec.decode_transfer(s.body_bytes(part), part.cte), part.charset)
    where = placement.find_html(text) if leaf == "html" else placement.find_text(text)
    assert where.rule == rule, (cls, where)


def test_a_body_over_the_search_window_is_searched_in_its_first_part_only() -> None:
    """Issue #14: reply markers are looked for in the first SEARCH_WINDOW characters (a 25 MB log
    would otherwise cost seconds); past it the signature goes to the end and says why."""
    filler = "2026-11-28 12:00:01 INFO processed request in 12 ms\n" * (placement.SEARCH_WINDOW // 40)
    late = f"{NEW}\n{filler}\nOn Fri, Jan 3, 2025 at 4:01 PM Bob wrote:\n> old\n"
    where = placement.find_text(late)
    assert (where.rule, where.offset) == ("text:end", len(late)) and "KiB" in where.doubt
    early = f"{NEW}\n\nOn Fri, Jan 3, 2025 at 4:01 PM Bob wrote:\n" + "".join("> " + x for x in filler.splitlines(True))
    where = placement.find_text(early)
    assert where.rule == "text:attribution" and early[where.offset:].startswith("On Fri") and not where.doubt
    html = f"<html><body><div>{NEW}</div>" + "<p>row</p>" * (placement.SEARCH_WINDOW // 8) + \
        '<div class="gmail_quote">old</div></body></html>'
    where = placement.find_html(html)
    assert where.rule == "html:body-end" and html[where.offset:].startswith("</body>") and "KiB" in where.doubt
    rows = "<p>row</p>" * (placement.SEARCH_WINDOW // 8)
    html = f'<html><body><div>{NEW}</div><div class="gmail_quote">old{rows}</div></body></html>'
    where = placement.find_html(html)
    assert where.rule == "html:gmail" and html[where.offset:].startswith('<div class="gmail_quote"')
