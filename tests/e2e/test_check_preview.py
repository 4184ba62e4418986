"""`signature-relay check` and `preview` as a person uses them, and the preview in a real browser."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "relay"]
REPO = Path(__file__).resolve().parents[2]


def checkout(tmp: Path) -> Path:
    """A copy of the repo's default deployment (sample tenant contoso) with a fresh dev PKI."""
    for d in ("rules", "signatures"):
        shutil.copytree(REPO / d, tmp / d)
    subprocess.run([*CLI, "certs", "init", "--missing-only"], cwd=tmp, check=True, capture_output=True, timeout=60)
    return tmp


def test_check_passes_on_the_sample_tenant(tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "check"], cwd=checkout(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "7 user(s), 3 group(s), 8 rule(s), 8 template(s)" in r.stdout and "template render(s) checked" in r.stdout


def test_check_on_a_broken_config_names_every_error(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    rules = root / "rules" / "contoso" / "rules.toml"
    rules.write_text(rules.read_text().replace('senders = { groups = ["Sales"], except_users',
                                               'senders = { groups = ["Sales", "Ghosts"], except_users')
                     .replace('new = "support"', 'new = "supprot"')
                     + '\n[[rule]]\nname = "Broken"\n'
                       'window = { start = 2027-01-01T00:00:00, end = 2026-01-01T00:00:00 }\n'
                       'senders = { where = [{ attribute = "jobTitle", matches = "(" }] }\nnew = "default"\n')
    (root / "signatures" / "contoso" / "short.html.j2").write_text("<p>{{ user.displayName | shout }}</p>\n")
    r = subprocess.run([*CLI, "check"], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    err = r.stderr
    assert "short.html.j2:1: No filter named 'shout'" in err
    assert "rule[1] ('Sales').senders.groups: unknown group 'Ghosts'" in err
    assert "rule[3] ('Support (by department)').new: template 'supprot' not found" in err
    assert "rule[8] ('Broken').window: end 2026-01-01T00:00:00+00:00 is not after start" in err
    assert "rule[8] ('Broken').senders.where[0].matches: bad regular expression" in err
    assert "FAILED: 5 error(s)" in err, err  # exactly these, no cascade


def test_preview_explains_and_renders_in_chromium(tmp_path: Path) -> None:
    from PIL import Image

    root = checkout(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([*CLI, "preview", "--from", "alice@contoso.com", "--to", "ceo@example.org", "--subject",
                        "Your quote", "--at", "2026-06-01T10:00", "--out", str(out)],
                       cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "recipient ceo@example.org: signature 'sales' from rule 'Sales', disclaimer 'disclaimer'" in r.stdout
    assert "[MATCH, applied] Sales" in r.stdout and "false  time in" in r.stdout  # banner window closed in June
    page = out / "preview-1.html"
    html = page.read_text()
    assert "Alice Wilber" in html and "data:image/png;base64," in html
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:  # `make test` installs it; a missing browser is a failure, not a skip
        pytest.fail("chromium not installed: run `make test` (installs it from Debian)")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=800,400",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20) or []
    by_color = {c: n for n, c in colors}
    # the logo (48x48, #0078d4) and the sales accent border (#d83b01) are on screen
    assert by_color.get((0, 120, 212), 0) >= 48 * 48 * 0.9, sorted(colors, reverse=True)[:5]
    assert by_color.get((216, 59, 1), 0) >= 3 * 40
    dark_text = sum(n for n, c in colors if isinstance(c, tuple) and c[0] < 90 and c[1] < 90 and c[2] < 90)
    assert dark_text > 200  # the rendered name and title
