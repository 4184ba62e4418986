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


def _signature_for(args: argparse.Namespace) -> tuple[object, str]:
    """The signature to stamp with: --html/--text files, else the tenant's (by --tenant or the
    domain of --from)."""
    from relay.mime.stamper import Signature

    if args.html or args.text:
        if not (args.html and args.text):
            raise ConfigError("--html/--text", "", "give both --html FILE and --text FILE")
        return Signature(open(args.html, encoding="utf-8").read(), open(args.text, encoding="utf-8").read()), "files"
    cfg = _config(args)
    tenant = cfg.tenant_by_name(args.tenant) if args.tenant else None
    if args.tenant and tenant is None:
        raise ConfigError(cfg.source, "--tenant", f"no tenant {args.tenant!r} (have: "
                          f"{', '.join(t.name for t in cfg.tenants)})")
    if tenant is None and args.mail_from:
        tenant = cfg.tenant_by_domain(args.mail_from.rpartition("@")[2])
    if tenant is None and len(cfg.tenants) == 1:
        tenant = cfg.tenants[0]
    if tenant is None:
        raise ConfigError(cfg.source, "--tenant", "cannot tell which tenant's signature to use: give --tenant")
    if tenant.signature_html is None or tenant.signature_text is None:
        return None, f"tenant {tenant.name} (no signature files)"
    return Signature(tenant.signature_html, tenant.signature_text), f"tenant {tenant.name}"


def cmd_stamp(args: argparse.Namespace) -> int:
    from relay.mime.stamper import Signature, stamp

    sig, source = _signature_for(args)
    assert sig is None or isinstance(sig, Signature)
    mail_from = args.mail_from
    if args.report:
        return _report(args.report, sig, mail_from, args.bottom)
    raw = sys.stdin.buffer.read()
    result = stamp(raw, sig, mail_from=mail_from, bottom=args.bottom)
    sys.stdout.buffer.write(result.data)
    sys.stdout.buffer.flush()
    print(f"decision: {result.decision}" + (f"\nplacement: {result.placement}" if result.placement else "")
          + (f"\nanomalies: {', '.join(result.anomalies)}" if result.anomalies else "")
          + f"\nsignature: {source}\nsize: {len(raw)} -> {len(result.data)} bytes", file=sys.stderr)
    return 0


def _report(paths: list[str], sig: object, mail_from: str | None, bottom: bool) -> int:
    """Replay a corpus: one line per file, then a summary. Never stops at a bad file."""
    import collections
    from pathlib import Path

    from relay.mime.stamper import Signature, stamp

    assert sig is None or isinstance(sig, Signature)
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.eml")) if p.is_dir() else [p]
    decisions: collections.Counter[str] = collections.Counter()
    placements: collections.Counter[str] = collections.Counter()
    errors = 0
    progress = sys.stderr.isatty() and len(files) > 200
    for i, f in enumerate(files, 1):
        try:
            raw = f.read_bytes()
            r = stamp(raw, sig, mail_from=mail_from, bottom=bottom)
        except OSError as e:
            errors += 1
            print(f"ERROR\t-\t{f}\t{e.strerror}")
            continue
        except Exception as e:  # a crash is a bug to report, not a reason to stop the replay
            errors += 1
            print(f"CRASH\t-\t{f}\t{type(e).__name__}: {e}")
            continue
        decisions[str(r.decision)] += 1
        for rule in r.placement.split():
            placements[rule] += 1
        print(f"{r.decision}\t{r.placement or '-'}\t{f}" + (f"\t[{','.join(r.anomalies)}]" if r.anomalies else ""))
        if progress and i % 100 == 0:
            print(f"... {i}/{len(files)}", file=sys.stderr)
    print(f"\n{len(files)} file(s): " + ", ".join(f"{n} {d}" for d, n in decisions.most_common())
          + (f", {errors} error(s)" if errors else ""))
    if placements:
        print("placements: " + ", ".join(f"{n} {p}" for p, n in placements.most_common()))
    return 1 if errors else 0


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

    st = sub.add_parser(
        "stamp", help="stamp one message (stdin → stdout) or replay a corpus (--report)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Dry-run the stamping engine on .eml files. The decision (stamped / pass-through and why)\n"
                    "and the placement rule go to stderr; the stamped message to stdout.",
        epilog="examples:\n"
               "  signature-relay stamp --from alice@contoso.com < reply.eml > stamped.eml\n"
               "  signature-relay stamp --report ~/mail-samples/        # summary of decisions and placements")
    _add_config(st)
    st.add_argument("--tenant", help="use this tenant's signature (default: the tenant of --from)")
    st.add_argument("--from", dest="mail_from", metavar="ADDR", default=None,
                    help="envelope sender (use --from '' for the null sender)")
    st.add_argument("--to", dest="rcpt", metavar="ADDR", action="append", default=[],
                    help="envelope recipient (recorded for rules; repeatable)")
    st.add_argument("--html", metavar="FILE", help="signature HTML fragment (with --text) instead of the tenant's")
    st.add_argument("--text", metavar="FILE", help="signature plain text (with --html)")
    st.add_argument("--bottom", action="store_true", help="place at the bottom instead of under the newest reply")
    st.add_argument("--report", nargs="+", metavar="FILE_OR_DIR",
                    help="replay .eml files (directories recursively) and summarise decisions and placements")
    st.set_defaults(func=cmd_stamp)

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
