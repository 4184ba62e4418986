"""``signature-relay queue …``: see and steer the spool, also while the relay runs.

The running relay notices every change at its next spool rescan (``delivery.rescan_interval``,
15 s by default). Human-readable output by default, ``--json`` for scripts; exit status 1 when an
id is not in the spool.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.delivery import admin
from relay.delivery.spool import Spool

HELP = """\
verbs:
  list                 every queued and held copy, oldest first
  show ID              one copy: envelope, attempts, last error, key headers, hold reason
  retry ID | --all     make queued copies due now
  hold ID              set a copy aside in hold/ (not retried until released)
  release ID           put a held copy back in the queue, due now
  delete ID            remove a copy for good (no DSN is sent)
  stats                counts, bytes, oldest age, per tenant

The spool is delivery.spool_dir of the config (-c). Quarantined files (unreadable at start) are
counted by `stats`; read their .reason files in <spool>/quarantine/.
"""


def add_queue_command(sub: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    q = sub.add_parser("queue", help="list, show, retry, hold, release, delete spooled mail; stats",
                       description="See and steer the spool, also while the relay runs.\n\n" + HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    qsub = q.add_subparsers(dest="queue_command", required=True, metavar="VERB")
    for verb, helptext, needs_id in (
        ("list", "every queued and held copy", False), ("show", "one copy in detail", True),
        ("retry", "make a queued copy (or --all) due now", False), ("hold", "set a copy aside in hold/", True),
        ("release", "put a held copy back, due now", True), ("delete", "remove a copy for good", True),
        ("stats", "counts, bytes, oldest age", False),
    ):
        v = qsub.add_parser(verb, help=helptext, description=helptext)
        add_config(v)
        if needs_id:
            v.add_argument("id", help="the copy's id, as `queue list` shows it")
        elif verb == "retry":
            v.add_argument("id", nargs="?", help="the copy's id")
            v.add_argument("--all", action="store_true", help="every queued copy")
        v.add_argument("--json", action="store_true", help="machine-readable output")
        v.add_argument("--worker", type=int, metavar="I",
                       help="the spool of worker I (serve --workers N gives each worker its own)")
        v.set_defaults(func=cmd_queue)


def _age(seconds: float) -> str:
    s = int(abs(seconds))
    text = f"{s // 86400}d{s % 86400 // 3600}h" if s >= 86400 else (
        f"{s // 3600}h{s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m{s % 60}s")
    return text if seconds >= 0 else f"in {text}"


def _print_list(its: list[admin.Item]) -> None:
    if not its:
        print("spool is empty")
        return
    now = time.time()
    print(f"{'ID':<22} {'STATE':<6} {'AGE':>7} {'NEXT':>9} {'TRIES':>5} {'SIZE':>8}  "
          "TENANT / FROM → RCPTS / LAST ERROR")
    for it in sorted(its, key=lambda i: i.entry.created):
        e = it.entry
        nxt = "-" if it.state == "held" else ("now" if e.next_attempt <= now else _age(now - e.next_attempt))
        rcpts = ", ".join(e.rcpts[:3]) + (f" (+{len(e.rcpts) - 3})" if len(e.rcpts) > 3 else "")
        print(f"{e.id:<22} {it.state:<6} {_age(now - e.created):>7} {nxt:>9} {e.attempts:>5} {it.size:>8}  "
              f"{e.tenant} / <{e.mail_from}> → {rcpts}")
        if it.reason or e.last_error:
            print(f"{'':<22} {it.reason or e.last_error}")
    print(f"{len(its)} cop(ies)")


def _spool_root(root: Path, worker: int | None) -> Path:
    if worker is not None:
        return root / f"worker-{worker}"  # serve --workers N: each worker has its own spool
    if any(root.glob("worker-*")):
        others = ", ".join(sorted(p.name for p in root.glob("worker-*")))
        print(f"note: this relay runs several workers, each with its own spool ({others}): add --worker I",
              file=sys.stderr)
    return root


def cmd_queue(args: argparse.Namespace) -> int:
    from relay.cli import _config

    cfg = _config(args, policies=False)
    spool = Spool(_spool_root(cfg.delivery.spool_dir, args.worker), cfg.delivery.min_free_space)
    verb = args.queue_command
    note = f"the running relay picks this up within {cfg.delivery.rescan_interval:g} s"
    try:
        if verb == "list":
            its = admin.items(spool)
            print(json.dumps([i.as_dict() for i in its], indent=2)) if args.json else _print_list(its)
        elif verb == "stats":
            _stats(spool, args.json)
        elif verb == "show":
            _show(spool, args.id, args.json)
        elif verb == "retry":
            if not args.all and not args.id:
                print("signature-relay queue retry: give an ID or --all", file=sys.stderr)
                return 2
            if args.all:
                done = []
                for it in admin.items(spool):
                    if it.state == "queued":
                        try:
                            done.append(admin.retry(spool, it.entry.id).entry.id)
                        except admin.NotInSpool:
                            continue  # delivered or removed by the running relay meanwhile
            else:
                done = [admin.retry(spool, args.id).entry.id]
            _done(args, "retry", done, note)
        else:  # hold, release, delete
            it = {"hold": admin.hold, "release": admin.release, "delete": admin.delete}[verb](spool, args.id)
            _done(args, verb, [it.entry.id], note)
    except admin.NotInSpool as e:
        print(f"signature-relay queue {verb}: no copy {e} in {spool.root} (see `queue list`)", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"signature-relay queue {verb}: {e}", file=sys.stderr)
        return 1
    return 0


def _stats(spool: Spool, as_json: bool) -> None:
    st = admin.stats(spool)
    if as_json:
        print(json.dumps(st, indent=2))
        return
    print(f"spool {st['spool']}: {st['queued']} queued ({st['due_now']} due now), {st['held']} held, "
          f"{st['quarantined']} quarantined, {st['bytes']} bytes; oldest {_age(st['oldest_seconds'])}")
    for tenant, n in sorted(st["by_tenant"].items()):
        print(f"  {tenant}: {n}")


def _show(spool: Spool, eid: str, as_json: bool) -> None:
    it = admin.find(spool, eid)
    hdrs = admin.headers(spool, it)
    if as_json:
        print(json.dumps({**it.as_dict(), "headers": hdrs}, indent=2))
        return
    e = it.entry
    created = dt.datetime.fromtimestamp(e.created, dt.UTC).isoformat(timespec="seconds")
    print(f"id:           {e.id} ({it.state})\ntenant:       {e.tenant}\nfrom:         <{e.mail_from}>\n"
          f"to:           {', '.join(f'<{r}>' for r in e.rcpts)}\nsize:         {it.size} bytes\n"
          f"created:      {created}\nattempts:     {e.attempts}\nlast error:   {e.last_error or '-'}")
    if it.reason:
        print(f"held because: {it.reason}")
    for k, v in hdrs:
        print(f"{k + ':':<13} {v}")


def _done(args: argparse.Namespace, verb: str, ids: list[str], note: str) -> None:
    if args.json:
        print(json.dumps({"action": verb, "ids": ids}))
    else:
        print(f"{verb}: {len(ids)} cop(ies){': ' + ', '.join(ids) if ids else ''} ({note})")
