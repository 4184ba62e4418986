"""``signature-relay directory sync``: fill a tenant's directory from Microsoft Entra ID.

    signature-relay directory sync [--tenant T] [--full] [--force] [--no-photos] [--no-reload]

The tenant's ``tenant.toml`` says where and how (``[directory] source = "graph"``, ``app_id``,
``certificate``, ``cloud``...; README "Directory from Microsoft Entra ID"). After a successful
sync the running relay (``<var_dir>/signature-relay.pid``) is asked to reload (SIGHUP).
Exit codes: 0 synced, 1 refused (the current snapshot is kept, the reason is printed), 2 usage
or configuration, 3 sign-in or permission, 4 Graph unreachable, 5 still throttled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from relay.config import Config, Tenant
from relay.errors import ConfigError

PIDFILE = "signature-relay.pid"


def add_directory_command(sub: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    d = sub.add_parser("directory", help="sync a tenant's users, groups and photos from Microsoft Entra ID (Graph)")
    dsub = d.add_subparsers(dest="directory_command", required=True, metavar="ACTION")
    s = dsub.add_parser(
        "sync", help="one sync now (delta: only what changed since the last one)",
        description="Read users, groups and photos from Microsoft Graph with the tenant's [directory] settings, "
                    "write a new snapshot, check that every template renders for every user, swap it in and ask "
                    "the running relay to reload. A failed or suspicious sync keeps the current snapshot.")
    add_config(s)
    s.add_argument("--tenant", help="tenant name (default: every tenant with [directory] source = \"graph\")")
    s.add_argument("--full", action="store_true", help="read everything again instead of the changes")
    s.add_argument("--force", action="store_true",
                   help="accept a snapshot even when the user count dropped by more than max_drop")
    s.add_argument("--no-photos", action="store_true", help="do not fetch photos this time (keeps none)")
    s.add_argument("--no-reload", action="store_true", help="do not signal the running relay")
    s.set_defaults(func=cmd_directory_sync)


def graph_tenants(cfg: Config, name: str | None) -> list[Tenant]:
    ts = [t for t in cfg.tenants if t.graph is not None and (name is None or t.name == name)]
    if name and not ts:
        t = cfg.tenant_by_name(name)
        if t is None:
            raise ConfigError(cfg.source, "--tenant", f"no tenant {name!r}")
        raise ConfigError(str(t.source), "directory.source", 'is "file": set source = "graph" and app_id, '
                          "certificate to sync it from Microsoft Graph")
    if not ts:
        raise ConfigError(cfg.source, "directory", 'no tenant has [directory] source = "graph"')
    return ts


def sync_tenant(cfg: Config, t: Tenant, *, full: bool = False, force: bool = False, photos: bool | None = None,
                log: Callable[[str], None] = print) -> Any:
    """One sync of ``t`` (raises ApiError, SyncRefused); returns the :class:`relay.dirsync.Result`."""
    from relay import dirsync
    from relay.graph import GRAPH_URLS, Graph
    from relay.provisioning.api import CLOUDS, msal_token_provider

    g = t.graph
    assert g is not None
    verify: str | bool = str(g.ca_bundle) if g.ca_bundle else True
    graph_url = g.graph_url or GRAPH_URLS[g.cloud]
    token = msal_token_provider(tenant_id=t.id, app_id=g.app_id, certificate=g.certificate,
                                login_base=g.login_url or CLOUDS[g.cloud].login_url, verify=verify,
                                resource=GRAPH_URLS[g.cloud])
    graph = Graph(base_url=graph_url, token=token, verify=verify, log=log)
    try:
        check = dirsync.check_snapshot(t.name, t.source.parent, t.signature_dir or cfg.signatures_dir / t.name,
                                       t.accepted_domains, t.images_base_url)
        opts = dirsync.Options(full=full, photos=g.photos if photos is None else photos, photo_size=g.photo_size,
                               max_drop=g.max_drop, force=force)
        return dirsync.sync(graph, g.root, check, opts, log=log)
    finally:
        graph.close()


def cmd_directory_sync(args: argparse.Namespace) -> int:
    from relay.cli import _config
    from relay.dirsync import SyncRefused
    from relay.provisioning.api import ApiError

    cfg = _config(args, policies=False)
    rc = 0
    synced = False
    for t in graph_tenants(cfg, args.tenant):
        def log(m: str, name: str = t.name) -> None:
            print(f"{name}: {m}", flush=True)

        try:
            r = sync_tenant(cfg, t, full=args.full, force=args.force, photos=False if args.no_photos else None,
                            log=log)
        except SyncRefused as e:
            print(f"{t.name}: sync refused: {e}", file=sys.stderr)
            rc = max(rc, 1)
            continue
        except ApiError as e:
            print(f"{t.name}: sync failed: {e}", file=sys.stderr)
            rc = max(rc, e.exit_code)
            continue
        synced = True
        log(f"{'full' if r.full else 'incremental'} sync: {r.users} user(s), {r.groups} group(s) in the snapshot; "
            f"{r.users_changed} user and {r.groups_changed} group change(s) read, {r.photos_fetched} photo(s) "
            f"fetched, {r.requests} request(s), {r.seconds:.1f} s; snapshot {r.snapshot}")
    if synced and not args.no_reload:
        pid = running_relay(cfg)
        if pid:
            os.kill(pid, signal.SIGHUP)
            print(f"asked the running relay (pid {pid}) to reload")
        else:
            print("no running relay found (no live pid in "
                  f"{cfg.var_dir / PIDFILE}); it reads the snapshot when it starts")
    return rc


def running_relay(cfg: Config) -> int | None:
    try:
        pid = int((cfg.var_dir / PIDFILE).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def start_scheduler(cfg: Config, say: Callable[[str], None]) -> None:
    """Run :class:`Scheduler` when any tenant syncs from Graph on a schedule."""
    if any(t.graph and t.graph.sync_interval for t in cfg.tenants):
        Scheduler(cfg, say).start()


@contextlib.contextmanager
def pidfile(cfg: Config, enabled: bool = True) -> Any:
    """``<var_dir>/signature-relay.pid`` while serve runs (what ``directory sync`` signals)."""
    if not enabled:
        yield
        return
    path = cfg.var_dir / PIDFILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{os.getpid()}\n")
    except OSError:
        path = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                if path.read_text().split()[0] == str(os.getpid()):
                    path.unlink()


class Scheduler(threading.Thread):
    """``serve``: sync every Graph tenant whose ``sync_interval`` has passed (checked each
    minute), then SIGHUP ourselves so the relay reloads through its usual path."""

    def __init__(self, cfg: Config, log: Callable[[str], None]) -> None:
        super().__init__(daemon=True, name="directory-sync")
        self.cfg, self.log, self.stop = cfg, log, threading.Event()
        self.tried: dict[str, float] = {}  # a failed sync waits a whole interval too, never hammers Graph

    def due(self) -> list[Tenant]:
        from relay.dirsync import State

        now = time.time()
        out = []
        for t in self.cfg.tenants:
            if t.graph and t.graph.sync_interval:
                last = max(State.load(t.graph.root / "state.json").synced_at, self.tried.get(t.name, 0.0))
                if now - last >= t.graph.sync_interval:
                    out.append(t)
        return out

    def run(self) -> None:
        while not self.stop.wait(60.0):
            for t in self.due():
                self.tried[t.name] = time.time()
                def log(m: str, name: str = t.name) -> None:
                    self.log(f"directory {name}: {m}")

                try:
                    r = sync_tenant(self.cfg, t, log=log)
                    self.log(f"directory {t.name}: synced, {r.users} user(s); reloading")
                    os.kill(os.getpid(), signal.SIGHUP)
                except Exception as e:  # a failed sync keeps the old snapshot; try again next interval
                    self.log(f"directory {t.name}: sync failed, keeping the current snapshot: {e}")
