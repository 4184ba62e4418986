"""Directory sync from Microsoft Graph at scale (issue #16): 10,000 users in 100 groups, served by
the local HTTPS Graph emulator the tests use, synced by the real CLI in a child process.

    .venv/bin/python benchmarks/dirsync_bench.py [--users 10000] [--groups 100] [--photos 0]

Reports the full sync's wall time and the child's peak RSS, then changes 10 users and reports the
incremental sync: its time, and that it read exactly those 10 (requests carry $deltatoken only).
Writes benchmarks/results-dirsync.txt.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.graph_emulator import GraphEmulator, GraphState  # noqa: E402
from tests.protocol.test_provisioning import APP_ID, app_pem  # noqa: E402
from tests.support import CONTOSO_ID, make_deployment  # noqa: E402


def run_sync(config: Path, cwd: Path) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, output) of one `directory sync` in a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "relay", "directory", "sync", "-c", str(config), "--no-reload"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"sync failed:\n{out}")
    return seconds, usage.ru_maxrss * 1024, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--groups", type=int, default=100)
    ap.add_argument("--photos", type=int, default=0, help="users with a photo (each costs two requests)")
    ap.add_argument("--out", type=Path, default=HERE / "results-dirsync.txt")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sr-dirsync-") as tmp:
        root = Path(tmp)
        dep = make_deployment(root)
        cfg = dep.load()
        pem = root / "app.pem"
        st = GraphState(CONTOSO_ID, APP_ID, app_pem(cfg, "signature-relay-graph", pem), page_size=999)
        for i in range(args.users):
            st.add_user(f"u{i:06d}", mail=f"user{i}@contoso.com", displayName=f"User {i}", jobTitle="Engineer",
                        department=f"Dept {i % 40}", businessPhones=["+1 425 555 0100"], accountEnabled=True,
                        userType="Member", proxyAddresses=[f"SMTP:user{i}@contoso.com"],
                        onPremisesExtensionAttributes={"extensionAttribute1": f"cc-{i % 13}"})
        per = max(1, args.users // args.groups)
        for g in range(args.groups):
            st.add_group(f"g{g:04d}", f"Group {g}", [f"user:u{i:06d}" for i in range(g * per, (g + 1) * per)])
        for i in range(args.photos):
            st.photos[f"u{i:06d}"] = b"\xff\xd8\xff\xe0" + os.urandom(4000) + b"\xff\xd9"
        with GraphEmulator(st, cfg.tls.cert, cfg.tls.key) as emu:
            t = dep.root / "rules" / "contoso"
            (t / "tenant.toml").write_text((t / "tenant.toml").read_text() + (
                f'\n[directory]\nsource = "graph"\napp_id = "{APP_ID}"\ncertificate = "{pem}"\n'
                f'graph_url = "{emu.state.base}"\nlogin_url = "{emu.state.base}"\n'
                f'ca_bundle = "{cfg.certs.ca_cert}"\nphotos = {"true" if args.photos else "false"}\n'))
            sig = dep.root / "signatures" / "contoso"
            sig.mkdir(parents=True, exist_ok=True)
            (sig / "sig.html.j2").write_text("<p>{{ user.displayName }} · {{ user.jobTitle }} · "
                                             "{{ user.extensionAttribute1 }}</p>\n")
            (t / "rules.toml").write_text('[[rule]]\nname = "Group 1"\nsenders = { groups = ["Group 1"] }\n'
                                          'new = "sig"\n[[rule]]\nname = "Everyone"\nnew = "sig"\n')
            full_s, full_rss, _ = run_sync(dep.config_path, dep.root)
            full_requests = len(st.requests)
            st.requests.clear()
            for i in range(0, 10_000 if args.users >= 10_000 else args.users, max(1, args.users // 10))[:10]:
                st.change_user(f"u{i:06d}", jobTitle="Manager")
            inc_s, inc_rss, inc_out = run_sync(dep.config_path, dep.root)
            delta_only = all("$deltatoken=" in r for r in st.requests if "/delta" in r)
            changed = re.search(r"(\d+) user and (\d+) group change\(s\) read", inc_out)
    lines = [
        f"directory sync benchmark: {args.users} users, {args.groups} groups, {args.photos} photos "
        "(local HTTPS Graph emulator; the sync is the real CLI in a child process)",
        f"full sync: {full_s:.1f} s wall, peak RSS {full_rss / 2**20:.0f} MiB, {full_requests} requests "
        f"({full_s * 1e6 / args.users:.0f} µs per user, including the check that renders every template for "
        "every user)",
        f"incremental sync after changing 10 users: {inc_s:.1f} s wall, peak RSS {inc_rss / 2**20:.0f} MiB, "
        f"{len(st.requests)} requests, all delta requests with $deltatoken: {delta_only}, "
        f"changes read: {changed.group(1) if changed else '?'} user(s), {changed.group(2) if changed else '?'} "
        "group(s)",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.out.write_text(text)
    return 0 if delta_only and changed and changed.group(1) == "10" else 1


if __name__ == "__main__":
    sys.exit(main())
