"""Issue #15 (in part): the shipped Prometheus alert rules parse, and every metric they use exists
on the relay's /metrics (a renamed metric must not silently disable an alert)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.protocol.conftest import Stack
from tests.protocol.test_relay_protocol import send
from tests.support import message

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


async def test_every_metric_in_the_alert_rules_exists(stack: Stack) -> None:
    doc = yaml.safe_load(RULES.read_text("utf-8"))
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"SignatureRelayDeferralsHigh", "SignatureRelayQueueOld",
                                           "SignatureRelayHeld", "SignatureRelayCertificateExpiring"}
    assert all(r["expr"] and r["labels"]["severity"] and r["annotations"]["runbook"] for r in rules)
    assert (await send(stack, message()))[0] == 250  # labelled counters appear once used
    exposed = set(re.findall(r"^(signature_relay_[a-z_]+)", stack.relay.metrics.render().decode(), re.M))
    used = {m for r in rules for m in re.findall(r"signature_relay_[a-z_]+", r["expr"])}
    assert used and used <= exposed, used - exposed
