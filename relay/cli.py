"""``signature-relay`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay import __version__, config
from relay import log as logsetup
from relay.errors import ConfigError, PermanentError, RelayError

EPILOG = """\
Quick start (from a checkout):
  make serve                      # dev certificates + relay on 127.0.0.1:2525 + local tenant sink
  swaks --server 127.0.0.1:2525 --tls --from alice@contoso.com --to someone@example.net

Configuration: --config FILE, else $SIGNATURE_RELAY_CONFIG, else the embedded dev profile
(relay/defaults/relay.toml; relative paths resolve against the current directory).
"""


def _config(args: argparse.Namespace, policies: bool = True) -> config.Config:
    """The configuration, with tenants' rules and templates loaded unless ``policies=False``
    (commands that never stamp: certificates, the sink, tenants add)."""
    path = args.config or os.environ.get("SIGNATURE_RELAY_CONFIG") or None
    cfg = config.load(path)
    if not policies:
        return cfg
    from relay import policy

    return policy.attach(cfg)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE",
                   help="service config (TOML). Default: $SIGNATURE_RELAY_CONFIG or the embedded dev profile")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text: logfmt lines (default); json: one JSON object per line, the per-message "
                        "line with its fields as keys")
    p.add_argument("--log-privacy", action="store_true",
                   help="replace every address in the logs with a keyed hash (HMAC-SHA256 with the key in "
                        "$SIGNATURE_RELAY_LOG_KEY, at least 16 characters): lines still correlate, names do not show")


def _say(args: argparse.Namespace, msg: str, level: int = logging.INFO) -> None:
    """A lifecycle line for the operator: plain on stderr, or a JSON log line with --log-format json
    (so a log pipeline sees only JSON)."""
    if getattr(args, "log_format", "text") == "json":
        logging.getLogger("relay").log(level, msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def _serve_argv(args: argparse.Namespace) -> list[str]:
    """The serve options a worker process gets from its supervisor."""
    argv = ["--log-level", args.log_level, "--log-format", args.log_format]
    if args.config:
        argv[:0] = ["-c", args.config]
    if args.log_privacy:
        argv.append("--log-privacy")
    return argv


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from relay import dircli, supervisor

    main_process = args.worker_index is None  # not a worker: owns the pidfile and the directory syncs
    if args.workers > 1 and main_process:
        _say(args, f"signature-relay {__version__}: starting {args.workers} workers on "
                   f"{', '.join(f'{lst.host}:{lst.port}' for lst in cfg.listeners)}, config {cfg.source}")
        with dircli.pidfile(cfg):
            dircli.start_scheduler(cfg, lambda m: _say(args, m))
            return supervisor.Supervisor(cfg, _serve_argv(args), args.workers, args.no_sink).run()

    def view(c: config.Config) -> config.Config:  # a worker's own spool and metrics port
        if args.worker_index is None:
            return c
        return supervisor.worker_config(c, args.worker_index, args.worker_metrics_port, args.listen_fds or "")

    cfg = view(cfg)
    from relay import eventloop, offload
    from relay.service import Relay

    offload.release_big_buffers()
    loop_name = eventloop.install(cfg.event_loop, implicit_tls=cfg.implicit_tls)
    from relay.sink import Sink

    async def run() -> None:
        relay = Relay(cfg)
        sink = Sink(cfg) if cfg.sink.enabled and not args.no_sink else None
        # Signals are handled before the ports open: a SIGHUP that arrives as soon as a client can
        # connect must reload, not kill the process with the default action.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reload = _Reloader(args, view, relay, sink)
        loop.add_signal_handler(signal.SIGHUP, reload)
        if sink:
            await sink.start()
        await relay.start()
        _say(args, f"signature-relay {__version__} ready: {len(cfg.tenants)} tenant(s) "
                   f"[{', '.join(t.name for t in cfg.tenants)}], config {cfg.source}, event loop {loop_name}")
        reload.ready()
        if main_process:
            dircli.start_scheduler(cfg, lambda m: _say(args, m))
        await stop.wait()
        _say(args, "signature-relay: shutting down (finishing messages in flight)")
        await relay.stop()
        if sink:
            await sink.stop()

    with dircli.pidfile(cfg, enabled=main_process):
        asyncio.run(run())
    return 0


class _Reloader:
    """SIGHUP: re-read the configuration and hand it to the relay (and the dev sink); a bad one is
    refused and the old one keeps serving. One that arrives while the relay is starting is applied
    once it is up. After each reload the heap is settled again (:func:`relay.offload.settle_heap`)."""

    def __init__(self, args: argparse.Namespace, view: Any, relay: Any, sink: Any) -> None:
        self.args, self.view, self.relay, self.sink = args, view, relay, sink
        self.started = self.pending = False

    def ready(self) -> None:
        from relay import offload

        offload.settle_heap()
        self.started = True
        if self.pending:
            self()

    def __call__(self) -> None:
        from relay import offload

        if not self.started:
            self.pending = True
            return
        try:
            new = self.view(_config(self.args))
            self.relay.reload(new)
            if self.sink:
                self.sink.reload(new)
            offload.settle_heap()
            _say(self.args, "signature-relay: configuration reloaded")
        except ConfigError as e:
            _say(self.args, f"signature-relay: reload refused, still running the previous configuration: {e}",
                 logging.ERROR)


def cmd_sink(args: argparse.Namespace) -> int:
    cfg = _config(args, policies=False)
    from relay import eventloop
    from relay.sink import Sink, SinkBehavior

    eventloop.install(cfg.event_loop)

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

    cfg = _config(args, policies=False)
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

    cfg = _config(args, policies=False)
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
    """Validate everything and render every template for every directory user; report all errors."""
    from relay.delivery.client import client_context
    from relay.errors import ConfigErrors
    from relay.smtp import tls

    try:
        cfg = _config(args)
    except ConfigErrors as e:
        for err in e.errors:
            print(f"error: {err}", file=sys.stderr)
        print(f"FAILED: {len(e.errors)} error(s)", file=sys.stderr)
        return 1
    errors: list[str] = []
    try:
        tls.server_context(cfg.tls, where=f"{cfg.source}: [tls]")
    except ConfigError as e:
        errors.append(str(e))
    renders = 0
    for t in cfg.tenants:
        try:
            client_context(cfg.delivery, t)
        except ConfigError as e:
            errors.append(str(e))
        p = t.policy
        print(f"tenant {t.name}: id {t.id}, domains {', '.join(sorted(t.accepted_domains))}, "
              f"certificate name {t.certificate_name}, endpoint {t.endpoint}; "
              f"{len(p.directory.people) if p else 0} user(s), {len(p.directory.groups) if p else 0} group(s), "
              f"{len(p.rules.rules) if p else 0} rule(s), {len(p.templates.templates) if p else 0} template(s)")
        if p is not None:
            renders += p.render_all(errors)
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    if errors:
        print(f"FAILED: {len(errors)} error(s)", file=sys.stderr)
        return 1
    from relay import eventloop

    loop = eventloop.choose(cfg.event_loop, implicit_tls=cfg.implicit_tls)
    print(f"OK: {cfg.source}, {len(cfg.tenants)} tenant(s), {renders} template render(s) checked; "
          f"serve runs on {loop}")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    """Which rule applies to each recipient and why; writes each copy's .eml and an .html preview,
    produced by the same flow the relay runs (:func:`relay.pipeline.run`)."""
    import datetime as dt

    from relay import pipeline
    from relay.policy import message_of, sender_identity

    cfg = _config(args)
    tenant = _tenant_for(cfg, args.tenant, args.mail_from)
    if tenant.policy is None:
        raise ConfigError(str(tenant.source), "", "tenant has no rules")
    policy = tenant.policy
    at = dt.datetime.fromisoformat(args.at) if args.at else dt.datetime.now(dt.UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    rcpts = list(args.rcpt) + list(args.cc)
    if not rcpts:
        raise ConfigError("--to", "", "give at least one --to (or --cc) recipient")
    settings = pipeline.Settings.of(cfg)
    inbound = pipeline.accept(Path(args.eml).read_bytes() if args.eml else _preview_message(args), settings)
    msg = message_of(inbound.raw, args.mail_from or "", at, inbound.top)
    who = sender_identity(inbound.raw, args.mail_from or "", inbound.top)
    print(f"tenant {tenant.name}; sender {msg.sender} ({who.how}); {msg.kind} message; at {at.isoformat()}")
    for r in rcpts:
        outcome = policy.rules.outcome(policy.directory, msg, r.lower())
        print(f"\nrecipient {r}: " + (", ".join(f"{s.section} '{s.template}' from rule '{s.rule}'" for s in outcome)
                                      or "no signature"))
        for line in policy.rules.explain(policy.directory, msg, r.lower()):
            print(line)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    copies = pipeline.run(inbound, policy=policy, envelope=pipeline.Envelope(args.mail_from or "", tuple(rcpts), at),
                          settings=settings)
    print(f"\n{len(copies)} cop{'y' if len(copies) == 1 else 'ies'} (one per distinct outcome):")
    for n, copy in enumerate(copies, 1):
        p = copy.processed
        eml = out_dir / f"preview-{n}.eml"
        eml.write_bytes(p.data)
        page = out_dir / f"preview-{n}.html"
        page.write_text(_preview_page(p.data), "utf-8")
        print(f"  copy {n} for {', '.join(copy.recipients)}: {p.decision}"
              + (f", {p.placement}" if p.placement else "")
              + (f" (render error: {copy.render_error})" if copy.render_error else "") + f"\n    {eml}\n    {page}")
    return 0


def _preview_message(args: argparse.Namespace) -> bytes:
    """A small multipart/alternative message to preview on (a reply with history when --reply)."""
    subject = ("RE: " if args.reply else "") + (args.subject or "Preview")
    extra = "In-Reply-To: <previous@example.net>\r\n" if args.reply else ""
    quote = ("\r\n\r\nOn Mon, 6 Jan 2025, Someone <someone@example.net> wrote:\r\n> Earlier message\r\n"
             if args.reply else "\r\n")
    return (f"From: {args.mail_from}\r\nTo: {', '.join(args.rcpt)}\r\n"
            + (f"Cc: {', '.join(args.cc)}\r\n" if args.cc else "")
            + f"Subject: {subject}\r\n{extra}MIME-Version: 1.0\r\n"
            "Content-Type: multipart/alternative; boundary=\"preview\"\r\n\r\n"
            "--preview\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello," + quote
            + "--preview\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>Hello,</p>"
            + ('<div class="gmail_quote">On Mon, 6 Jan 2025, Someone wrote:<blockquote>Earlier message'
               "</blockquote></div>" if args.reply else "")
            + "</body></html>\r\n--preview--\r\n").encode("utf-8")


def _preview_page(data: bytes) -> str:
    """The copy's HTML body with its cid: images inlined as data: URIs, so a browser shows exactly
    what the recipient's client will."""
    import base64
    import email
    import email.policy

    from relay.mime import codec, scanner
    from relay.mime.classify import find_targets

    s = scanner.scan(data)
    html_part = find_targets(s).get("html")
    if html_part is None:
        return "<p>(no HTML body)</p>"
    html = codec.decode_text(codec.decode_transfer(s.body_bytes(html_part), html_part.cte), html_part.charset)
    for part in email.message_from_bytes(data, policy=email.policy.compat32).walk():
        cid = (part.get("Content-ID") or "").strip("<> ")
        payload = part.get_payload(decode=True) if cid else None
        if cid and isinstance(payload, bytes):
            html = html.replace(f"cid:{cid}", f"data:{part.get_content_type()};base64,"
                                              f"{base64.b64encode(payload).decode()}")
    return html


def _tenant_for(cfg: config.Config, name: str | None, mail_from: str | None) -> config.Tenant:
    tenant = cfg.tenant_by_name(name) if name else None
    if name and tenant is None:
        have = ", ".join(t.name for t in cfg.tenants)
        raise ConfigError(cfg.source, "--tenant", f"no tenant {name!r} (have: {have})")
    if tenant is None and mail_from:
        tenant = cfg.tenant_by_domain(mail_from.rpartition("@")[2])
    if tenant is None and len(cfg.tenants) == 1:
        tenant = cfg.tenants[0]
    if tenant is None:
        raise ConfigError(cfg.source, "--tenant", "cannot tell which tenant: give --tenant")
    return tenant


def cmd_stamp(args: argparse.Namespace) -> int:
    from relay.mime.stamper import Signature

    cfg = _config(args)
    policy = None
    if args.html or args.text:
        if not (args.html and args.text):
            raise ConfigError("--html/--text", "", "give both --html FILE and --text FILE")
        with open(args.html, encoding="utf-8") as h, open(args.text, encoding="utf-8") as t:
            sig: Signature | None = Signature(h.read(), t.read())
        source = "files"
    elif args.tenant or args.mail_from or len(cfg.tenants) == 1:
        tenant = _tenant_for(cfg, args.tenant, args.mail_from)
        sig, source, policy = None, f"tenant {tenant.name} rules", tenant.policy
    else:  # each message's tenant from its From: domain, as binding would find it
        sig, source = None, "the rules of the tenant of each message's From:"
    flow = _Flow(cfg, sig, policy, args.mail_from, list(args.rcpt) or ["recipient@example.net"], args.bottom)
    if args.report:
        return _report(args.report, flow)
    raw = sys.stdin.buffer.read()
    try:
        copies = flow.run(raw)
    except RelayError as e:
        print(f"refused: {e.reply} ({e.detail})", file=sys.stderr)  # what the relay would answer after DATA
        return 1
    p = copies[0].processed  # the copy that holds the first recipient
    sys.stdout.buffer.write(p.data)
    sys.stdout.buffer.flush()
    print(f"decision: {p.decision}" + (f"\nplacement: {p.placement}" if p.placement else "")
          + (f"\nplacement unsure: {'; '.join(p.doubts)}" if p.doubts else "")
          + (f"\nanomalies: {', '.join(p.anomalies)}" if p.anomalies else "")
          + f"\nsignature: {source}" + (f" ({copies[0].sections})" if copies[0].sections not in ("", "files") else "")
          + (f"\ncopies: {len(copies)} (stdout has the one for {copies[0].recipients[0]})" if len(copies) > 1 else "")
          + f"\nsize: {len(raw)} -> {len(p.data)} bytes", file=sys.stderr)
    return 0


class _Flow:
    """The relay's own flow (:mod:`relay.pipeline`) with the configuration's settings, for dry runs."""

    def __init__(self, cfg: config.Config, sig: Any, policy: Any, mail_from: str | None, rcpts: list[str],
                 bottom: bool) -> None:
        from relay import pipeline

        self.cfg, self.settings = cfg, pipeline.Settings.of(cfg)
        self.sig, self.policy, self.mail_from, self.rcpts, self.bottom = sig, policy, mail_from, rcpts, bottom

    def run(self, raw: bytes | bytearray) -> list[Any]:
        import datetime as dt

        from relay import binding, pipeline, replies
        from relay import policy as policy_mod

        inbound = pipeline.accept(raw, self.settings)
        # No --from: the message's own From: address, as Exchange Online's envelope sender usually is
        # (an empty sender would make every file a null-sender pass-through).
        # The From: address as the rules read it (policy.sender_identity), and its domain as binding
        # normalises it for the tenant lookup.
        mail_from = self.mail_from if self.mail_from is not None else \
            policy_mod.sender_identity(inbound.raw, "", inbound.top).address
        policy = self.policy
        if policy is None and self.sig is None:  # several tenants, none named: the one of this From:
            domain = next(iter(binding.from_domains(inbound.top)), "")
            tenant = self.cfg.tenant_by_domain(domain)
            if tenant is None:
                raise PermanentError(replies.NOT_AUTHORIZED, f"no tenant serves the From: domain {domain!r}")
            policy = tenant.policy
        envelope = pipeline.Envelope(mail_from, tuple(self.rcpts), dt.datetime.now(dt.UTC))
        return pipeline.run(inbound, policy=policy, envelope=envelope, settings=self.settings,
                            signature=self.sig, bottom=self.bottom)


def _report(paths: list[str], flow: _Flow) -> int:
    """Replay a corpus: one line per file, then a summary. Never stops at a bad file."""
    import collections
    from pathlib import Path

    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.eml")) if p.is_dir() else [p]
    decisions: collections.Counter[str] = collections.Counter()
    placements: collections.Counter[str] = collections.Counter()
    errors = doubtful = refused = 0
    progress = sys.stderr.isatty() and len(files) > 200
    for i, f in enumerate(files, 1):
        try:
            r = flow.run(f.read_bytes())[0].processed
        except RelayError as e:
            refused += 1
            print(f"refused({e.reply.code} {e.reply.enhanced})\t-\t{f}\t{e.detail}")
            continue
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
        # "?" marks a placement that is a guess (interleaved quotes, history-like text without a
        # marker...): the lines an admin replaying their own mail should look at first.
        unsure = "?" if r.doubts else ""
        doubtful += bool(unsure)
        print(f"{r.decision}\t{unsure}{r.placement or '-'}\t{f}"
              + (f"\t[{','.join(r.anomalies)}]" if r.anomalies else "")
              + (f"\t(unsure: {'; '.join(r.doubts)})" if r.doubts else ""))
        if progress and i % 100 == 0:
            print(f"... {i}/{len(files)}", file=sys.stderr)
    print(f"\n{len(files)} file(s): " + ", ".join(f"{n} {d}" for d, n in decisions.most_common())
          + (f", {refused} refused at ingress" if refused else "") + (f", {errors} error(s)" if errors else ""))
    if placements:
        print("placements: " + ", ".join(f"{n} {p}" for p, n in placements.most_common()))
    if doubtful:
        print(f"unsure placements (marked ?): {doubtful} — check where the signature landed in those")
    return 1 if errors else 0


def _plan(args: argparse.Namespace) -> tuple[config.Config, Any]:
    from relay.provisioning import plan as planmod

    cfg = _config(args)
    tenant = _tenant_for(cfg, args.tenant, None)
    try:
        p = planmod.build(cfg, tenant, scope=args.scope, exclude_internal=args.exclude_internal,
                          size_cap=args.size_cap, except_oof=args.except_oof, except_recall=args.except_recall,
                          recall_subjects=tuple(args.recall_subject or planmod.RECALL_SUBJECTS),
                          except_m365_groups=args.except_m365_groups)
    except ValueError as e:
        flag = "--except-m365-groups" if str(e).startswith("--except-m365-groups") else "--scope"
        raise ConfigError(flag, "", str(e).removeprefix("--except-m365-groups: ")) from e
    return cfg, p


def cmd_connectors_plan(args: argparse.Namespace) -> int:
    from relay.provisioning import plan as planmod

    _, p = _plan(args)
    parts = {"text": planmod.to_text, "powershell": planmod.to_powershell, "json": planmod.to_json}
    chosen = list(parts) if args.format == "all" else [args.format]
    for i, f in enumerate(chosen):
        if i:
            print()
        print(parts[f](p), end="" if f != "json" else "\n")
    return 0


def _api(args: argparse.Namespace, cfg: config.Config) -> Any:
    from pathlib import Path

    from relay.provisioning.api import CLOUDS, AdminApi, ApiError, msal_token_provider

    tenant = _tenant_for(cfg, args.tenant, None)
    if not args.app_id or not args.certificate:
        raise ApiError("give --app-id and --certificate (PEM with the app registration's private key and "
                       "certificate); see README 'Exchange Online setup'", exit_code=2)
    verify: str | bool = args.ca_bundle or True
    cloud = CLOUDS[args.cloud]
    token = msal_token_provider(tenant_id=args.tenant_id or tenant.id, app_id=args.app_id,
                                certificate=Path(args.certificate), login_base=args.login_url or cloud.login_url,
                                verify=verify, resource=cloud.resource)
    return AdminApi(base_url=args.admin_url or cloud.admin_url, tenant=args.tenant_id or tenant.id, token=token,
                    verify=verify, log=lambda m: print(m, flush=True), cloud=cloud)


def _apply_command(args: argparse.Namespace) -> str:
    """The full `connectors apply` that fixes what `check` found: same tenant, credentials, cloud
    and scope flags (a bare `apply` would widen a narrowed scope)."""
    parts = ["signature-relay", "connectors", "apply"]
    for flag, value in (("-c", args.config), ("--tenant", args.tenant), ("--app-id", args.app_id),
                        ("--certificate", args.certificate), ("--tenant-id", args.tenant_id),
                        ("--cloud", None if args.cloud == "global" else args.cloud), ("--admin-url", args.admin_url),
                        ("--login-url", args.login_url), ("--ca-bundle", args.ca_bundle),
                        ("--scope", None if args.scope == "all" else args.scope), ("--size-cap", args.size_cap)):
        if value:
            parts += [flag, shlex.quote(str(value))]
    parts += [f for f, on in (("--exclude-internal", args.exclude_internal), ("--except-oof", args.except_oof),
                              ("--except-recall", args.except_recall),
                              ("--except-m365-groups", args.except_m365_groups)) if on]
    for prefix in args.recall_subject or ():
        parts += ["--recall-subject", shlex.quote(prefix)]
    return " ".join(parts)


def cmd_connectors(args: argparse.Namespace) -> int:
    from relay.provisioning import wizard
    from relay.provisioning.api import ApiError

    cfg, p = _plan(args)
    try:
        api = _api(args, cfg)
        try:
            if args.action == "apply":
                wizard.apply(api, p, log=lambda m: print(m, flush=True), dry_run=args.dry_run,
                             validation_recipient=args.validation_recipient)
                return 0
            if args.action == "check":
                problems = wizard.check(api, p, apply_cmd=_apply_command(args))
                for prob in problems:
                    print(f"DRIFT: {prob}")
                print(f"{len(problems)} problem(s)" if problems else f"OK: tenant {p.tenant} matches the plan")
                return 1 if problems else 0
            n = wizard.remove(api, p, log=lambda m: print(m, flush=True))
            print(f"Removed {n} object(s).")
            return 0
        finally:
            api.close()
    except ApiError as e:
        print(f"signature-relay connectors {args.action}: {e}", file=sys.stderr)
        if args.action == "check" and e.exit_code == 1:
            return 6  # could not check (Exchange Online refused a read): not the same as drift (1)
        return e.exit_code


def _write_tenant_atomically(tdir: Path, text: str) -> None:
    """``tdir/tenant.toml`` appears complete or not at all: written and fsync'd in a temporary
    sibling directory, which is then renamed into place (a rename is atomic on one filesystem)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{tdir.name}.", dir=tdir.parent))
    try:
        with open(tmp / "tenant.toml", "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, tdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cmd_tenants_add(args: argparse.Namespace) -> int:
    import base64
    import secrets
    import uuid

    cfg = _config(args, policies=False)
    name = args.name.lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,40}", name):
        raise ConfigError("NAME", "", "use lower-case letters, digits and '-'")
    if cfg.tenant_by_name(name):
        raise ConfigError(str(cfg.tenants_dir / name / "tenant.toml"), "", "tenant exists already")
    try:
        tid = str(uuid.UUID(args.id))
    except ValueError as e:
        raise ConfigError("--id", "", f"not a tenant GUID: {args.id!r}") from e
    initial = args.initial_domain.lower()
    if not initial.endswith(".onmicrosoft.com"):
        raise ConfigError("--initial-domain", "", "must be the tenant's *.onmicrosoft.com domain")
    sub = f"{name}-{base64.b32encode(secrets.token_bytes(5)).decode().lower()[:6]}"
    # Validate everything first, with the loader's own rules (issue #11: a bad --domain used to
    # leave a tenant.toml behind that broke every later command).
    domains = sorted({config.check_domain(d, "--domain", "") for d in args.domain} | {initial})
    endpoint = args.endpoint or f"mx:{initial}"
    try:
        config.Endpoint.parse(endpoint)
    except ValueError as e:
        raise ConfigError("--endpoint", "", f"expected 'host:port' or 'mx:<domain>[:port]' ({e})") from e
    text = (f'[tenant]\nid = "{tid}"\ninitial_domain = "{initial}"\n'
            f'accepted_domains = [{", ".join(chr(34) + d + chr(34) for d in domains)}]\n'
            f'region = "{args.region}"\nsubdomain = "{sub}"\n\n[inbound]\nendpoint = "{endpoint}"\n')
    tdir = cfg.tenants_dir / name
    _write_tenant_atomically(tdir, text)
    try:
        cfg2 = config.load(cfg.source if cfg.source != config.DEFAULT_CONFIG_NAME else None)  # data only
    except ConfigError:
        shutil.rmtree(tdir)  # never half-applied: the configuration stays as it was
        raise
    t = cfg2.tenant_by_name(name)
    assert t is not None
    print(f"tenant {name} added: {tdir / 'tenant.toml'}")
    print(f"  smart host (outbound connector):        {t.subdomain}.{'de-smtp' if t.region == 'de' else 'smtp'}."
          f"{cfg2.service_domain}")
    print(f"  certificate name (inbound connector):   {t.certificate_name}")
    if cfg2.certs.ca_key.exists():
        from relay import certs

        issued = certs.init_dev_pki(cfg2, missing_only=True)
        for i in issued:
            if i.created:
                print(f"  dev client certificate: {i.cert_path}")
    print(f"next: signature-relay connectors plan --tenant {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signature-relay", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="SMTP relay that stamps email signatures for Exchange Online tenants: Exchange Online's "
                    "outbound connector hands it mail over TLS, it marks/stamps the message and hands it back "
                    "through the tenant's inbound connector.")
    p.add_argument("--version", action="version", version=f"signature-relay {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_serve_command, _add_sink_command, _add_certs_command, _add_stamp_command, _add_preview_command,
                _add_connectors_command, _add_tenants_command, _add_check_command):
        add(sub)
    from relay.dircli import add_directory_command
    from relay.queuecli import add_queue_command

    add_queue_command(sub, _add_config)
    add_directory_command(sub, _add_config)
    return p


def _add_serve_command(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the relay (and the dev sink when [sink] enabled = true)",
                       description="Run the relay. 250 is answered only after the tenant endpoint said 250.")
    _add_config(s)
    s.add_argument("--no-sink", action="store_true", help="do not start the dev tenant-inbound sink")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run N relay processes serving the same listening sockets (bound once by a supervisor: "
                        "an idle worker takes the next connection), supervised: a dead one is restarted, "
                        "SIGHUP/SIGTERM are passed on, /metrics shows every worker (label worker=I). "
                        "One per core is the usual choice")
    s.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    s.add_argument("--worker-metrics-port", type=int, help=argparse.SUPPRESS)
    s.add_argument("--listen-fds", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)


def _add_sink_command(sub: Any) -> None:
    s = sub.add_parser("sink", help="run only the dev tenant-inbound sink (Maildir under var/)",
                       description="A local stand-in for Exchange Online's inbound connector: STARTTLS and a "
                                   "client certificate named like a tenant's TlsSenderCertificateName required.")
    _add_config(s)
    s.add_argument("--reject-rcpt", metavar="REGEX", help="answer 550 5.1.1 to matching recipients")
    s.add_argument("--defer-rcpt", metavar="REGEX", help="answer 450 4.2.1 to matching recipients")
    s.add_argument("--data-reply", metavar="REPLY", help='answer DATA with this line, e.g. "451 4.3.0 later"')
    s.set_defaults(func=cmd_sink)


def _add_certs_command(sub: Any) -> None:
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


def _add_stamp_command(sub: Any) -> None:
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
                    help="envelope sender (default: each message's From: address; --from '' for the null sender)")
    st.add_argument("--to", dest="rcpt", metavar="ADDR", action="append", default=[],
                    help="envelope recipient (default recipient@example.net; repeatable: each distinct rule "
                         "outcome is a copy, stdout gets the one for the first recipient)")
    st.add_argument("--html", metavar="FILE", help="signature HTML fragment (with --text) instead of the tenant's")
    st.add_argument("--text", metavar="FILE", help="signature plain text (with --html)")
    st.add_argument("--bottom", action="store_true", help="place at the bottom instead of under the newest reply")
    st.add_argument("--report", nargs="+", metavar="FILE_OR_DIR",
                    help="replay .eml files (directories recursively) and summarise decisions and placements")
    st.set_defaults(func=cmd_stamp)


def _add_preview_command(sub: Any) -> None:
    pv = sub.add_parser(
        "preview", help="explain which rule applies to each recipient and write a stamped preview",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate the tenant's rules for a message and explain every condition, then write the\n"
                    "stamped .eml and an .html page of its HTML body (images inlined) to open in a browser.",
        epilog="example:\n  signature-relay preview --from alice@contoso.com --to bob@fabrikam.example --reply")
    _add_config(pv)
    pv.add_argument("--tenant", help="tenant name (default: the tenant of --from)")
    pv.add_argument("--from", dest="mail_from", metavar="ADDR", required=True, help="sender (From:)")
    pv.add_argument("--to", dest="rcpt", metavar="ADDR", action="append", default=[], help="recipient (repeatable)")
    pv.add_argument("--cc", metavar="ADDR", action="append", default=[], help="Cc recipient (repeatable)")
    pv.add_argument("--reply", action="store_true", help="a reply (RE:, quoted history) instead of a new message")
    pv.add_argument("--subject", help="subject (default 'Preview')")
    pv.add_argument("--at", metavar="TIME", help="evaluate time windows at this ISO time (default now, UTC)")
    pv.add_argument("--eml", metavar="FILE", help="use this message instead of a generated one")
    pv.add_argument("--out", metavar="DIR", default="var/preview", help="where to write (default var/preview)")
    pv.set_defaults(func=cmd_preview)


def _add_connectors_command(sub: Any) -> None:
    cn = sub.add_parser("connectors", help="plan, apply, check or remove the Exchange Online connectors and rule")
    cnsub = cn.add_subparsers(dest="action", required=True, metavar="ACTION")

    def scope_args(p: argparse.ArgumentParser) -> None:
        _add_config(p)
        p.add_argument("--tenant", help="tenant name (default: the only one)")
        p.add_argument("--scope", default="all", metavar="all|group:NAME",
                       help="senders routed to the relay: everyone, or members of a (possibly hidden) group")
        p.add_argument("--exclude-internal", action="store_true", help="only mail with external recipients")
        p.add_argument("--size-cap", type=int, metavar="BYTES", help="skip messages larger than this (e.g. 23592960)")
        p.add_argument("--except-oof", action="store_true", help="add a rule that keeps automatic replies away")
        p.add_argument("--except-recall", action="store_true",
                       help="add rules that keep Outlook recall requests away (Content-Class, and the subject "
                            "prefix 'Recall:')")
        p.add_argument("--recall-subject", action="append", metavar="PREFIX",
                       help="subject prefix of a recall request in your users' Outlook language, e.g. "
                            "'Rückruf:' (repeatable; replaces the default 'Recall:', so list it too)")
        p.add_argument("--except-m365-groups", action="store_true",
                       help="keep mail sent as a Microsoft 365 group away (groups with groupTypes = [\"Unified\"] "
                            "and a mail in groups.toml)")

    pl = cnsub.add_parser("plan", help="print every value to set, as admin-center steps, PowerShell and JSON",
                          description="What the tenant needs in Exchange Online, for an admin who prefers the manual "
                                      "route. Nothing is contacted.")
    scope_args(pl)
    pl.add_argument("--format", choices=["text", "powershell", "json", "all"], default="all")
    pl.set_defaults(func=cmd_connectors_plan)
    for action, helptext in (("apply", "create or update everything through the admin API (idempotent)"),
                             ("check", "compare Exchange Online with the plan; exit 1 on any drift"),
                             ("remove", "remove the rule, then the outbound, then the inbound connector")):
        ap = cnsub.add_parser(action, help=helptext, description=helptext)
        scope_args(ap)
        ap.add_argument("--app-id", help="app registration (client) id with Exchange.ManageAsApp")
        ap.add_argument("--certificate", metavar="PEM", help="the app's private key and certificate")
        ap.add_argument("--tenant-id", help="Entra tenant id or initial domain (default: the tenant's id)")
        ap.add_argument("--cloud", choices=["global", "gcc-high", "dod", "china"], default="global",
                        help="Microsoft 365 cloud: sets the admin API URL, sign-in authority and token scope "
                             "together (default: global)")
        ap.add_argument("--admin-url", help="override the cloud's admin API base URL (e.g. a test emulator)")
        ap.add_argument("--login-url", help="override the cloud's sign-in base URL")
        ap.add_argument("--ca-bundle", metavar="PEM", help="trust anchors for those URLs (default: system)")
        if action == "apply":
            ap.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
            ap.add_argument("--validation-recipient", default="validation@example.com",
                            help="external address Validate-OutboundConnector sends to")
        ap.set_defaults(func=cmd_connectors)


def _add_tenants_command(sub: Any) -> None:
    tn = sub.add_parser("tenants", help="register tenants")
    tnsub = tn.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")
    ta = tnsub.add_parser("add", help="register a tenant: writes rules/NAME/tenant.toml with a unique subdomain")
    _add_config(ta)
    ta.add_argument("name")
    ta.add_argument("--id", required=True, help="Entra ID tenant GUID")
    ta.add_argument("--initial-domain", required=True, help="the tenant's *.onmicrosoft.com domain")
    ta.add_argument("--domain", action="append", default=[], help="accepted domain (repeatable)")
    ta.add_argument("--region", choices=["global", "de"], default="global")
    ta.add_argument("--endpoint", help="inbound endpoint (default mx:<initial domain>)")
    ta.set_defaults(func=cmd_tenants_add)


def _add_check_command(sub: Any) -> None:
    k = sub.add_parser("check", help="validate the configuration and certificates, then exit")
    _add_config(k)
    k.set_defaults(func=cmd_check)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = None
    if getattr(args, "log_privacy", False):
        key = os.environ.get("SIGNATURE_RELAY_LOG_KEY", "").encode()
        if len(key) < 16:
            print("signature-relay: --log-privacy needs a key of at least 16 characters in $SIGNATURE_RELAY_LOG_KEY "
                  "(keep it secret and stable: the same key gives the same tokens)", file=sys.stderr)
            return 2
    logsetup.setup(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"), key)
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
