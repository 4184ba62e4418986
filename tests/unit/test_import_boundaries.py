"""Issue #11: layers you can see. The pure core imports no I/O module, and loading configuration
does not load the template engine. Each module is imported in a fresh interpreter and the modules
it pulled in are inspected, so a transitive import counts too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE = ["relay.mime.scanner", "relay.mime.classify", "relay.mime.placement", "relay.mime.stamper",
        "relay.mime.codec", "relay.mime.headers", "relay.mime.trace", "relay.rules", "relay.signatures",
        "relay.directory", "relay.policy", "relay.pipeline", "relay.binding", "relay.ingress", "relay.addresses",
        "relay.values", "relay.memo", "relay.errors", "relay.replies"]
IO = ("relay.smtp", "relay.delivery", "relay.provisioning", "relay.cli", "relay.service", "relay.sink",
      "relay.metrics", "relay.certs", "aiosmtpd", "aiosmtplib", "httpx", "msal", "dns", "prometheus_client")


def loaded_by(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("module", PURE)
def test_pure_core_imports_no_io(module: str) -> None:
    bad = sorted(m for m in loaded_by(module) if m in IO or m.startswith(tuple(p + "." for p in IO)))
    assert not bad, f"{module} pulls in I/O modules: {bad}"


def test_loading_configuration_does_not_load_the_template_engine() -> None:
    mods = loaded_by("relay.config")
    assert not {m for m in mods if m == "jinja2" or m.startswith("jinja2.")}
    assert "relay.policy" not in mods and "relay.rules" not in mods
