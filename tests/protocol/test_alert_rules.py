"""Issue #15 (in part): the shipped Prometheus alert rules parse, and every metric they use exists
on the relay's /metrics (a renamed metric must not silently disable an alert)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.protocol.conftest import Stack
from tests.protocol.test_durability import MakeStack
from tests.protocol.test_relay_protocol import send
from tests.support import Deployment, message

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
SUPERVISOR_METRICS = {"signature_relay_workers", "signature_relay_worker_restarts_total"}


async def test_every_metric_in_the_alert_rules_exists(stack: Stack) -> None:
    doc = yaml.safe_load(RULES.read_text("utf-8"))
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"SignatureRelayDeferralsHigh", "SignatureRelayQueueOld",
                                           "SignatureRelayHeld", "SignatureRelayCertificateExpiring"}
    assert all(r["expr"] and r["labels"]["severity"] and r["annotations"]["runbook"] for r in rules)
    assert (await send(stack, message()))[0] == 250  # labelled counters appear once used
    text = stack.relay.metrics.render().decode()
    # samples, and the families declared with no sample yet (a labelled counter before its first use)
    exposed = set(re.findall(r"^(?:# TYPE )?(signature_relay_[a-z_]+)", text, re.M))
    exposed |= {f"{m}_total" for m in re.findall(r"^# TYPE (signature_relay_[a-z_]+) counter", text, re.M)}
    # served by the `serve --workers` supervisor (tests/e2e/test_workers.py checks them there)
    exposed |= SUPERVISOR_METRICS
    used = {m for r in rules for m in re.findall(r"signature_relay_[a-z_]+", r["expr"])}
    assert used and used <= exposed, used - exposed


async def test_endpoint_tls_failures_are_counted_for_the_alert(make_stack: MakeStack, deployment: Deployment) -> None:
    """#15: the endpoint-TLS-failure alert needs a per-reason error counter."""
    f = deployment.root / "rules" / "contoso" / "tenant.toml"
    f.write_text(f.read_text() + 'tls_server_name = "mail.protection.outlook.example"\n')
    st = await make_stack()
    code, _ = await send(st, message())
    assert code == 451
    text = st.relay.metrics.render().decode()
    assert re.search(r'signature_relay_delivery_errors_total\{reason="tls",tenant="contoso"\} [1-9]', text), text
    doc = yaml.safe_load(RULES.read_text("utf-8"))
    exprs = {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}
    assert 'reason="tls"' in exprs["SignatureRelayEndpointTlsFailures"]


DASHBOARD = RULES.parents[1] / "grafana" / "signature-relay.json"


async def test_every_metric_on_the_dashboard_exists(stack: Stack) -> None:
    """#15: the Grafana dashboard parses as a dashboard and uses only metrics the relay exposes."""
    dash = json.loads(DASHBOARD.read_text("utf-8"))
    assert dash["uid"] == "signature-relay" and dash["schemaVersion"] >= 36 and dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    assert (await send(stack, message()))[0] == 250
    text = stack.relay.metrics.render().decode()
    exposed = set(re.findall(r"^(?:# TYPE )?(signature_relay_[a-z_]+)", text, re.M)) | SUPERVISOR_METRICS
    exposed |= {f"{m}_total" for m in re.findall(r"^# TYPE (signature_relay_[a-z_]+) counter", text, re.M)}
    used = {m for e in exprs for m in re.findall(r"signature_relay_[a-z_]+", e)}
    assert len(used) >= 10 and used <= exposed, used - exposed
    # the alerts and the dashboard watch the same failure modes
    alerts = " ".join(r["expr"] for g in yaml.safe_load(RULES.read_text("utf-8"))["groups"] for r in g["rules"])
    for m in ("signature_relay_delivery_errors_total", "signature_relay_queue_oldest_seconds",
              "signature_relay_certificate_expiry_seconds"):
        assert m in alerts and any(m in e for e in exprs)
