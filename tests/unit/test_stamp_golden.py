"""Golden corpus: every shape, encoding, charset and client reply format (tests/data/stamp)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from relay.mime.stamper import Signature, stamp
from tests.unit import invariants

DATA = Path(__file__).resolve().parents[1] / "data" / "stamp"
CASES = tomllib.loads((DATA / "cases.toml").read_text())
SIG = Signature(html=(DATA / "signature.html").read_text(), text=(DATA / "signature.txt").read_text())
REGEN = os.environ.get("SIGNATURE_RELAY_REGEN_GOLDEN") == "1"


def test_corpus_is_complete() -> None:
    inputs = {p.name.removesuffix(".in.eml") for p in DATA.glob("*.in.eml")}
    assert inputs <= set(CASES), f"inputs without an expectation: {inputs - set(CASES)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    case = CASES[name]
    raw = (DATA / f"{case.get('source', name)}.in.eml").read_bytes()
    result = stamp(raw, SIG, mail_from=case.get("mail_from", "alice@contoso.com"))
    assert str(result.decision) == case["decision"]
    assert result.placement == case.get("placement", "")
    invariants.check(raw, result, "Sales Director<br>Contoso Ltd.", "Alice Wilber · Sales Director")
    golden = DATA / f"{name}.out.eml"
    if REGEN:
        golden.write_bytes(result.data)
    assert golden.exists(), f"{golden.name} missing: run with SIGNATURE_RELAY_REGEN_GOLDEN=1 and review it"
    assert result.data == golden.read_bytes()
    assert stamp(result.data, SIG).data == result.data  # idempotent
