"""Issue #15: the container image builds from the Dockerfile, runs as non-root, and relays one
message: real podman, real swaks over STARTTLS into the dev sink on the host.

No registry for base images is reachable here, so the base is made from Debian's own packages
(debootstrap: python3 + venv, the Dockerfile's ``BASE`` build argument); it is kept as
``localhost/signature-relay-base:bookworm`` between runs. ``make test`` installs podman, runc and
debootstrap. This machine's kernel needs runc (crun refuses hybrid cgroups) and rlimits within
the hard limits: both are given on the command line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.mime import headers
from tests.e2e.test_swaks_loop import Procs, need, swaks
from tests.support import Deployment, make_deployment, wait_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/signature-relay-base:bookworm"
PODMAN_RUN = ["--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([need("podman"), *PODMAN_RUN, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"podman {' '.join(args[:3])}: {r.stderr[-2000:]}")
    return r


def base_image() -> str:
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return BASE
    with tempfile.TemporaryDirectory(prefix="sr-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run([need("debootstrap"), "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "bookworm", str(rootfs), "http://deb.debian.org/debian"], check=True, capture_output=True,
                       timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        r = subprocess.run([need("podman"), *PODMAN_RUN, "import", "-", BASE], stdin=tar.stdout, capture_output=True,
                           text=True, timeout=300)
        tar.wait()
        assert r.returncode == 0, r.stderr
    return BASE


def listening(port: int, name: str) -> None:
    """Until the relay in container ``name`` listens on 127.0.0.1:``port`` (host network)."""
    try:
        wait_port(port, None, 60)  # a container, not our child process
    except AssertionError as e:
        logs = podman("logs", name, check=False)
        raise AssertionError(f"the relay in the container did not listen on {port}: {logs.stdout}{logs.stderr}") from e


def build(tag: str) -> None:
    """``podman build`` of the Dockerfile on the Debian base. Where this machine reaches PyPI
    through a proxy with its own CA (``PIP_CERT``/``SSL_CERT_FILE``), the build sees that CA too."""
    mounts: list[str] = []
    ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    ctx = Path(tempfile.mkdtemp(prefix="sr-build-"))
    try:
        if ca and Path(ca).is_file():
            (ctx / "pip.conf").write_text("[global]\ncert = /etc/ssl/certs/host-ca.crt\n")
            mounts = ["-v", f"{ctx / 'pip.conf'}:/etc/pip.conf:ro", "-v", f"{ca}:/etc/ssl/certs/host-ca.crt:ro"]
        # --format docker: the OCI format has no HEALTHCHECK
        podman("build", "--format", "docker", "--network", "host", *LIMITS, *mounts,
               "--build-arg", f"BASE={base_image()}", "-t", tag, str(ROOT), timeout=1200)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    tag = f"localhost/signature-relay:test-{uuid.uuid4().hex[:8]}"
    build(tag)
    yield tag
    podman("rmi", "-f", tag, check=False)


def test_image_runs_as_non_root_and_relays_one_message(image: str, tmp_path: Path, pki_dir: Path) -> None:
    dep: Deployment = make_deployment(tmp_path / "dep", pki_from=pki_dir, signature=True)
    # What the container mounts at /etc/signature-relay: a copy the unprivileged user can read
    # (and write var/ in); throw-away test keys only.
    etc = Path(tempfile.mkdtemp(prefix="sr-etc-"))
    shutil.copytree(dep.root, etc, dirs_exist_ok=True, ignore=shutil.ignore_patterns("var"))
    for p in [etc, *etc.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o644)
    procs = Procs(dep)
    name = f"sr-test-{uuid.uuid4().hex[:8]}"
    try:
        procs.start("sink", "sink", port=dep.sink_port)
        podman("run", "-d", "--rm", "--name", name, "--network", "host", *LIMITS,
               "-v", f"{etc}:/etc/signature-relay", image, "serve", "--no-sink")
        listening(dep.relay_port, name)
        rc, out = swaks(dep, "--tls", "--tls-verify", "--tls-ca-path", str(dep.root / "certs" / "ca.crt"),
                        "--from", "alice@contoso.com", "--to", "bob@example.net")
        assert rc == 0, out
        assert re.search(r"<~  250 2\.0\.0 Ok \S+ accepted by tenant endpoint", out), out
        [got] = dep.delivered()
        assert headers.get_all(got, "X-CodeTwoProcessed") == ["true"] and b"Alice Wilber" in got
        # non-root inside, an unprivileged port, a health check, SIGTERM as the stop signal
        assert podman("exec", name, "id", "-u").stdout.strip() == "10025"
        cfg = podman("image", "inspect", image, "--format",
                     "{{.Config.User}} {{json .Config.Healthcheck}} {{.Config.StopSignal}}").stdout
        assert cfg.startswith("10025:10025 ") and "/healthz" in cfg and "SIGTERM" in cfg
    finally:
        podman("stop", "-t", "40", name, check=False, timeout=120)
        procs.stop_all()
        shutil.rmtree(etc, ignore_errors=True)
