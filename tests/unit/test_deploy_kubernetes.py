"""Issue #15: the Kubernetes manifests render with kustomize (``kubectl kustomize``), validate
offline against the Kubernetes API schemas (the ``kubernetes-validate`` package's bundled ones,
strict: no unknown fields), carry the probes, drain and security settings the README promises,
and ship a configuration ``signature-relay check`` accepts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from relay import certs, config

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
VARIANTS = {"base": "Deployment", "overlays/queue": "StatefulSet", "overlays/production": "Deployment"}
K8S_VERSION = "1.30.0"  # the oldest release still common in managed clusters; all fields used exist there
CRDS = {"cert-manager.io/v1"}  # not in the Kubernetes schemas: checked by hand below


def render(variant: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # `make test` installs it (Debian kubernetes-client); missing is a failure
        pytest.fail("kubectl not installed: run `make test` (it installs kubernetes-client from Debian)")
    r = subprocess.run([kubectl, "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_and_validates_offline(variant: str) -> None:
    docs = render(variant)
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Service", "PodDisruptionBudget", VARIANTS[variant]} <= kinds
    for d in docs:
        if d["apiVersion"] in CRDS:
            assert d["kind"] == "Certificate" and d["spec"]["secretName"] == "signature-relay-tls"
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)  # raises on any schema error


@pytest.mark.parametrize("variant", VARIANTS)
def test_workload_probes_drain_and_security(variant: str) -> None:
    docs = render(variant)
    [w] = [d for d in docs if d["kind"] == VARIANTS[variant]]
    pod = w["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz" and "livenessProbe" in c
    assert c["lifecycle"]["preStop"] and pod["terminationGracePeriodSeconds"] >= 30 + 10  # listen.stop_grace + room
    assert {p["containerPort"] for p in c["ports"]} == {2525, 9025}  # unprivileged in the pod
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # every ConfigMap a volume names exists (kustomize appends a content hash to generated names)
    cms = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for v in pod["volumes"]:
        if "configMap" in v:
            assert v["configMap"]["name"] in cms, v
    [svc] = [d for d in docs if d["kind"] == "Service"]
    assert svc["spec"]["externalTrafficPolicy"] == "Local"  # client IPs reach the relay (binding, allowlist)
    assert svc["spec"]["ports"] == [{"name": "smtp", "port": 25, "targetPort": "smtp", "protocol": "TCP"}]
    if VARIANTS[variant] == "StatefulSet":
        assert w["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "var"
        assert not any(v["name"] == "var" for v in pod["volumes"])  # the claim, not an emptyDir
    [pdb] = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == w["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("variant", ["base", "overlays/queue"])
def test_shipped_configuration_passes_check(variant: str, tmp_path: Path, pki_dir: Path) -> None:
    """The ConfigMaps, laid out where the pod mounts them, are a configuration the relay accepts."""
    docs = render(variant)
    [w] = [d for d in docs if d["kind"] == VARIANTS[variant]]
    pod = w["spec"]["template"]["spec"]
    by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    root = tmp_path / "etc"
    for m in pod["containers"][0]["volumeMounts"]:
        src = volumes.get(m["name"], {}).get("configMap")
        if not src:
            continue
        target = root / Path(m["mountPath"]).relative_to("/etc/signature-relay")
        data = by_name[src["name"]]["data"]
        if "subPath" in m:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[m["subPath"]])
        else:
            target.mkdir(parents=True, exist_ok=True)
            for k, v in data.items():
                (target / k).write_text(v)
    cfg_file = root / "relay.toml"
    text = cfg_file.read_text().replace("/etc/signature-relay", str(root)).replace(
        "/var/lib/signature-relay", str(tmp_path / "var"))
    cfg_file.write_text(text)
    # the Secrets' files: a server certificate and each tenant's client certificate
    ca = certs.load_pair(pki_dir / "ca.crt", pki_dir / "ca.key")
    cfg = config.load(str(cfg_file))
    pairs = [(cfg.tls.cert, cfg.tls.key, ["smtp.sigrelay.example.com"], True)]
    pairs += [(t.client_cert, t.client_key, [t.certificate_name], False) for t in cfg.tenants]
    for crt, key_path, names, server in pairs:
        cert, key = certs.issue(*ca, names, 30, server=server, client=not server)
        crt.parent.mkdir(parents=True, exist_ok=True)
        certs.save(cert, key, crt, key_path)
    r = subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(cfg_file)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert cfg.delivery.mode == ("queue" if "queue" in variant else "inline")
