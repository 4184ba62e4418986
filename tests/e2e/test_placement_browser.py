"""Issue #9, visual check: render stamped HTML replies in headless Chromium and assert from the page
(DOM order and layout positions, not pixels) that the signature lies between the newest text and
the quoted history. One browser launch: every case is an <iframe srcdoc>; a script in the parent
page measures them all on load and writes JSON into the page that ``--dump-dom`` prints."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from relay.mime import codec, scanner
from relay.mime.classify import find_targets
from relay.mime.stamper import Signature, stamp
from tests.unit.test_placement_classes import HTML_CASES, NEW
from tests.unit.test_reply_corpus import LABEL_DISAGREEMENTS

pytestmark = pytest.mark.e2e
REPLIES = Path(__file__).resolve().parents[1] / "data" / "replies"
SIG = Signature(html='<p style="margin:0">SIGPROBE signature</p>\n', text="SIGPROBE signature\n")

MEASURE = r"""
function norm(doc) {  // visible text with white space collapsed, and where each char came from
  const w = doc.createTreeWalker(doc.body, NodeFilter.SHOW_TEXT);
  let s = "", map = [], n;
  while ((n = w.nextNode())) {
    const p = n.parentElement;
    if (p && /^(STYLE|SCRIPT|TITLE)$/.test(p.tagName)) continue;
    for (let i = 0; i < n.data.length; i++) {
      let c = n.data[i];
      if (/\s/.test(c)) { if (s.endsWith(" ")) continue; c = " "; }
      s += c; map.push([n, i]);
    }
  }
  return {s, map};
}
function locate(doc, needle, last) {
  const {s, map} = norm(doc);
  const k = last ? s.lastIndexOf(needle, s.indexOf("SIGPROBE")) : s.indexOf(needle, s.indexOf("SIGPROBE"));
  if (k < 0) return null;
  const r = doc.createRange();
  r.setStart(map[k][0], map[k][1]);
  r.setEnd(map[k + needle.length - 1][0], map[k + needle.length - 1][1] + 1);
  return r;
}
window.addEventListener("load", () => {
  const out = [];
  for (const f of document.querySelectorAll("iframe")) {
    const doc = f.contentDocument, sig = doc.querySelector("div.signature-relay");
    const res = {id: f.id, sig: !!sig};
    if (sig) {
      const b = locate(doc, f.dataset.before, true), a = f.dataset.after ? locate(doc, f.dataset.after, false) : null;
      const st = sig.getBoundingClientRect();
      res.sigTop = st.top; res.sigBottom = st.bottom;
      if (b) { res.beforeFirst = !!(b.endContainer.compareDocumentPosition(sig) & 4);
               res.beforeBottom = b.getBoundingClientRect().bottom; }
      if (a) { res.afterLast = !!(sig.compareDocumentPosition(a.startContainer) & 4);
               res.afterTop = a.getBoundingClientRect().top; }
    }
    out.push(res);
  }
  const pre = document.createElement("pre"); pre.id = "result"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
"""


def html_leaf(raw: bytes) -> str:
    s = scanner.scan(raw.split(b"\r\n", 1)[1])
    p = find_targets(s)["html"]
    return codec.decode_text(codec.decode_transfer(s.body_bytes(p), p.cte), p.charset)


def cases() -> list[tuple[str, str, str, str]]:
    """(id, stamped HTML, newest-text needle, history needle)."""
    out = []
    for cid, body, _rule, before in HTML_CASES:
        doc = f"<html><body>{body}</body></html>"
        first_text = re.search(r">([^<]*[^<\s][^<]*)<", doc[doc.index(before):] + "<")
        history = " ".join(html.unescape(first_text.group(1)).split())[:12] if first_text else ""
        raw = ("From: a@contoso.com\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
               + doc + "\r\n").encode()
        out.append((f"class:{cid}", html_leaf(stamp(raw, SIG).data), NEW, history))
    for f in ("manifest.toml", "manual.toml"):
        for s in tomllib.loads((REPLIES / f).read_text("utf-8"))["sample"]:
            raw = (REPLIES / s["file"]).read_bytes()
            r = stamp(raw, SIG)
            if r.decision.action != "stamped" or "html" not in find_targets(scanner.scan(raw)) \
                    or s.get("leaf") == "plain" or not s["before"] or s["file"] in LABEL_DISAGREEMENTS:
                continue
            last = s["before"].split("\n")[-1][-16:].strip()
            out.append((f"corpus:{s['file']}", html_leaf(r.data), last, (s.get("after") or "")[:16].strip()))
    return out


def test_signature_sits_between_newest_text_and_history_in_a_real_browser(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:  # `make test` installs it; a missing browser is a failure, not a skip
        pytest.fail("chromium not installed: run `make test` (installs it from Debian)")
    all_cases = cases()
    frames = "".join(
        f'<iframe id="{html.escape(cid)}" data-before="{html.escape(b)}" data-after="{html.escape(a)}" '
        f'width="900" height="900" srcdoc="{html.escape(doc)}"></iframe>' for cid, doc, b, a in all_cases)
    page = tmp_path / "placements.html"
    # The charset is declared: without it Chromium guesses the file's encoding from the octets it has
    # read when parsing starts, and one CI run in many read the Chinese of an AOL reply as
    # windows-1252, so its newest text was not found ("before" missing from the results).
    page.write_text(f'<!doctype html><html><head><meta charset="utf-8"></head><body>{frames}'
                    f"<script>{MEASURE}</script></body></html>", "utf-8")
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                        page.as_uri()], capture_output=True, text=True, timeout=180, check=True)
    m = re.search(r'<pre id="result">(.*?)</pre>', r.stdout, re.S)
    assert m, r.stdout[-2000:] + r.stderr[-2000:]
    results = {x["id"]: x for x in json.loads(html.unescape(m.group(1)))}
    assert len(results) == len(all_cases) and len(all_cases) >= 30
    problems = []
    for cid, _doc, _b, a in all_cases:
        x = results[cid]
        ok = x["sig"] and x.get("beforeFirst") and x["beforeBottom"] <= x["sigTop"] + 0.5
        if a:
            ok = ok and x.get("afterLast") and x["sigBottom"] <= x["afterTop"] + 0.5
        if not ok:
            problems.append(x)
    assert not problems, json.dumps(problems, indent=0)
