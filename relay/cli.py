"""``signature-relay`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Sequence

from relay import __version__, config
from relay import log as logsetup
from relay.errors import ConfigError

EPILOG = """\
Quick start (from a checkout):
  make serve                      # dev certificates + relay on 127.0.0.1:2525 + local tenant sink
  swaks --server 127.0.0.1:2525 --tls --from alice@contoso.com --to someone@example.net

Configuration: --config FILE, else $SIGNATURE_RELAY_CONFIG, else the embedded dev profile
(relay/defaults/relay.toml; relative paths resolve against the current directory).
"""


def _config(args: argparse.Namespace) -> config.Config:
    path = args.config or os.environ.get("SIGNATURE_RELAY_CONFIG") or None
    return config.load(path)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE",
                   help="service config (TOML). Default: $SIGNATURE_RELAY_CONFIG or the embedded dev profile")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from relay.service import Relay
    from relay.sink import Sink

    async def run() -> None:
        relay = Relay(cfg)
        sink = Sink(cfg) if cfg.sink.enabled and not args.no_sink else None
        if sink:
            await sink.start()
        await relay.start()
        print(f"signature-relay {__version__} ready: {len(cfg.tenants)} tenant(s) "
              f"[{', '.join(t.name for t in cfg.tenants)}], config {cfg.source}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("signature-relay: shutting down (finishing messages in flight)", file=sys.stderr, flush=True)
        await relay.stop()
        if sink:
            await sink.stop()

    asyncio.run(run())
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from relay.sink import Sink, SinkBehavior

    behavior = SinkBehavior(
        reject_rcpt=re.compile(args.reject_rcpt) if args.reject_rcpt else None,
        defer_rcpt=re.compile(args.defer_rcpt) if args.defer_rcpt else None,
        data_reply=args.data_reply,
    )

    async def run() -> None:
        sink = Sink(cfg, behavior)
        await sink.start()
        print(f"tenant-inbound sink ready on {cfg.sink.host}:{cfg.sink.port}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await sink.stop()

    asyncio.run(run())
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    from relay import certs

    cfg = _config(args)
    try:
        issued = certs.init_dev_pki(cfg, force=args.force, missing_only=args.missing_only)
    except certs.CertsError as e:
        print(f"signature-relay certs init: {e}", file=sys.stderr)
        return 1
    created = [i for i in issued if i.created]
    for i in issued:
        cert = certs.load_pair(i.cert_path, i.key_path)[0]
        state = "created" if i.created else "kept   "
        print(f"{state} {i.role}: {i.cert_path} (key {i.key_path})\n    {certs.describe(cert)}")
    print(f"{len(created)} created, {len(issued) - len(created)} kept")
    return 0


def cmd_certs_show(args: argparse.Namespace) -> int:
    from relay import certs

    cfg = _config(args)
    rc = 0
    for role, cert_path, key_path, _names, _s, _c in [("dev CA", cfg.certs.ca_cert, cfg.certs.ca_key, (), 0, 0),
                                                      *certs.dev_pki_plan(cfg)]:
        if not cert_path.exists():
            print(f"missing {role}: {cert_path}")
            rc = 1
            continue
        cert = certs.load_pair(cert_path, key_path)[0]
        print(f"{role}: {cert_path}\n    {certs.describe(cert)}")
    return rc


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from relay.delivery.client import client_context
    from relay.smtp import tls

    tls.server_context(cfg.tls, where=f"{cfg.source}: [tls]")
    for t in cfg.tenants:
        client_context(cfg.delivery, t)
        print(f"tenant {t.name}: id {t.id}, domains {', '.join(sorted(t.accepted_domains))}, "
              f"certificate name {t.certificate_name}, endpoint {t.endpoint}")
    print(f"OK: {cfg.source}, {len(cfg.tenants)} tenant(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signature-relay", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="SMTP relay that stamps email signatures for Exchange Online tenants: Exchange Online's "
                    "outbound connector hands it mail over TLS, it marks/stamps the message and hands it back "
                    "through the tenant's inbound connector.")
    p.add_argument("--version", action="version", version=f"signature-relay {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the relay (and the dev sink when [sink] enabled = true)",
                       description="Run the relay. 250 is answered only after the tenant endpoint said 250.")
    _add_config(s)
    s.add_argument("--no-sink", action="store_true", help="do not start the dev tenant-inbound sink")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("sink", help="run only the dev tenant-inbound sink (Maildir under var/)",
                       description="A local stand-in for Exchange Online's inbound connector: STARTTLS and a "
                                   "client certificate named like a tenant's TlsSenderCertificateName required.")
    _add_config(s)
    s.add_argument("--reject-rcpt", metavar="REGEX", help="answer 550 5.1.1 to matching recipients")
    s.add_argument("--defer-rcpt", metavar="REGEX", help="answer 450 4.2.1 to matching recipients")
    s.add_argument("--data-reply", metavar="REPLY", help='answer DATA with this line, e.g. "451 4.3.0 later"')
    s.set_defaults(func=cmd_sink)

    c = sub.add_parser("certs", help="development certificates")
    csub = c.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    ci = csub.add_parser("init", help="create dev CA, server, sink and per-tenant client certificates",
                         description="Create the dev PKI under [certs] dir. Refuses to overwrite existing files.")
    _add_config(ci)
    g = ci.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="regenerate everything (new CA)")
    g.add_argument("--missing-only", action="store_true", help="create only what is missing, keep the rest")
    ci.set_defaults(func=cmd_certs_init)
    cs = csub.add_parser("show", help="print names, expiry and SHA-256 fingerprints")
    _add_config(cs)
    cs.set_defaults(func=cmd_certs_show)

    k = sub.add_parser("check", help="validate the configuration and certificates, then exit")
    _add_config(k)
    k.set_defaults(func=cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logsetup.setup(getattr(args, "log_level", "info"))
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as e:
        print(f"signature-relay: configuration error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"signature-relay: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
