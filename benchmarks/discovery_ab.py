"""A/B of relay/smtp/discovery.py (issue #14): relay CPU per 10 KB message (one per connection,
smtp-source, 20 sessions, plaintext benchmark profile) with a session's set-up done once per class
(method discovery cached, the constructor's tables made once: discovery.init_session), and with
aiosmtpd's own per-connection constructor and discovery restored, alternating in the same run.

    .venv/bin/python benchmarks/discovery_ab.py      # needs Postfix's smtp-source and smtp-sink (make bench-deps)

Writes benchmarks/results-discovery-ab.txt.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import e2e  # noqa: E402
from run import outlook_reply  # noqa: E402  (e2e put the repository on sys.path for tests.support)

from tests.support import free_port, wait_port  # noqa: E402

# aiosmtpd's own: its module's inspect and dir back, and init_session declines (no aiosmtpd matches).
UNDO = ("import aiosmtpd.smtp, inspect, relay.smtp.server, relay.smtp.discovery; aiosmtpd.smtp.inspect = inspect; "
        "del aiosmtpd.smtp.dir; relay.smtp.discovery.MIRRORS = 'none'; ")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="sr-ab-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        sink = e2e.Sink(free_port())
        relay = e2e.Relay(work, free_port(), sink.port, free_port())
        relay.stop()
        msg = work / "m.eml"
        msg.write_bytes(outlook_reply().replace(b"\r\n", b"\n"))
        res: dict[str, list[float]] = {"once per class": [], "per connection (aiosmtpd's own)": []}
        try:
            for _ in range(3):
                for mode in res:
                    serve = f"['serve', '-c', {str(relay.conf)!r}, '--log-level', 'warning']"
                    code = (UNDO if mode.startswith("per connection") else "") + \
                        f"from relay.cli import main; main({serve})"
                    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, cwd=HERE.parent)
                    wait_port(relay.port, p)
                    e2e.send(relay.port, msg, 200, 20, 1).wait()  # warm-up
                    c0 = e2e.cpu_seconds([p.pid])
                    e2e.send(relay.port, msg, 2000, 20, 1).wait()
                    res[mode].append((e2e.cpu_seconds([p.pid]) - c0) / 2000 * 1000)
                    p.terminate()
                    p.wait()
        finally:
            sink.stop()
    lines = [f"{k}: relay CPU per 10 KB message {', '.join(f'{x:.2f}' for x in v)} ms; best {min(v):.2f} ms"
             for k, v in res.items()]
    a, b = (min(v) for v in res.values())
    lines.append(f"once per class / per connection = {a / b:.2f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    (HERE / "results-discovery-ab.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
