from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay import config
from relay.errors import ConfigError
from tests.support import make_deployment


def test_embedded_default_is_the_dev_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    cfg = config.load()
    assert cfg.max_message_size == 157_286_400
    assert cfg.processed_header == "X-CodeTwoProcessed"
    contoso = cfg.tenant_by_name("contoso")
    assert contoso is not None
    assert {"contoso.com", "contoso.onmicrosoft.com"} <= contoso.accepted_domains
    assert contoso.certificate_name == "contoso-7q4k2m.smtp.signature-relay.test"
    assert cfg.tenant_by_domain("CONTOSO.COM.") is contoso
    assert cfg.tenant_by_id(contoso.id.upper()) is contoso


def write(tmp: Path, pki: Path, extra: str = "", tenant_patch: tuple[str, str] | None = None) -> Path:
    d = make_deployment(tmp, pki_from=pki, extra=extra)
    if tenant_patch:
        f = tmp / "rules" / "contoso" / "tenant.toml"
        f.write_text(f.read_text().replace(*tenant_patch))
    return d.config_path


@pytest.mark.parametrize(("extra", "key", "reason"), [
    ("\n[listen]\nsmpt = []\n", "listen", "Cannot declare"),
])
def test_toml_errors_name_the_file(tmp_path: Path, pki_dir: Path, extra: str, key: str, reason: str) -> None:
    p = write(tmp_path, pki_dir, extra)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(p) in str(e.value) and "invalid TOML" in str(e.value)
    assert key in str(e.value) and reason in str(e.value)  # the table and what TOML found wrong


@pytest.mark.parametrize(("old", "new", "key", "reason"), [
    ('subdomain = "contoso-7q4k2m"', 'subdomain = "contoso-7q4k2m"\nsubdomian = "x"', "tenant.subdomian",
     "unknown key"),
    ('endpoint = "127.0.0.1:', 'endpoint = "localhost', "inbound.endpoint", "expected 'host:port'"),
    ('id = "', 'id = "not-a-guid', "tenant.id", "not a tenant GUID"),
    ('accepted_domains = ["contoso.com"]', 'accepted_domains = ["contoso.com", "fabrikam.com"]',
     "tenant.accepted_domains", "already an accepted domain of tenant"),
    ('initial_domain = "contoso.onmicrosoft.com"', 'initial_domain = "contoso.com"', "tenant.initial_domain",
     "onmicrosoft.com"),
])
def test_tenant_errors_name_file_key_reason(
    tmp_path: Path, pki_dir: Path, old: str, new: str, key: str, reason: str,
) -> None:
    p = write(tmp_path, pki_dir, tenant_patch=(old, new))
    with pytest.raises(ConfigError) as e:
        config.load(p)
    # duplicate-domain errors are reported on whichever of the two tenants loads second
    assert e.value.file.endswith("tenant.toml")
    assert e.value.key == key
    assert reason in e.value.reason


def test_service_errors_name_key(tmp_path: Path, pki_dir: Path) -> None:
    p = write(tmp_path, pki_dir)
    p.write_text(p.read_text().replace("idle_timeout = 30", "idle_timeout = \"30\""))
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert (e.value.file, e.value.key) == (str(p), "listen.idle_timeout")
    assert "expected a number" in e.value.reason


def test_missing_file_and_relative_paths(tmp_path: Path, pki_dir: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")
    p = write(tmp_path, pki_dir)
    other = tmp_path / "elsewhere"
    other.mkdir()
    cwd = os.getcwd()
    os.chdir(other)
    try:
        cfg = config.load(p)
    finally:
        os.chdir(cwd)
    assert cfg.tls.cert == tmp_path / "certs" / "server.crt"  # relative to the config file


def test_endpoint_parsing() -> None:
    assert config.Endpoint.parse("mx:Contoso.onmicrosoft.com.") == config.Endpoint("mx", "contoso.onmicrosoft.com", 25)
    assert config.Endpoint.parse("mx:x.test:2526").port == 2526
    assert config.Endpoint.parse("[::1]:25") == config.Endpoint("host", "::1", 25)
    for bad in ("::1:25", "host", "host:0", "mx:bad_domain!", "host:99999"):
        with pytest.raises(ValueError):
            config.Endpoint.parse(bad)


def test_config_objects_are_frozen(tmp_path: Path, pki_dir: Path) -> None:
    cfg = config.load(write(tmp_path, pki_dir))
    with pytest.raises(AttributeError):
        cfg.hostname = "x"  # type: ignore[misc]


def test_mime_limits_are_configurable(tmp_path: Path, pki_dir: Path) -> None:
    from relay import pipeline
    from relay.mime.stamper import Signature
    from tests.unit.test_mime_units import _nested

    p = write(tmp_path, pki_dir, extra="\n[mime]\nmax_depth = 5\nmax_parts = 50\n")
    cfg = config.load(p)
    assert (cfg.mime_limits.max_depth, cfg.mime_limits.max_parts) == (5, 50)
    sig = Signature("<p>s</p>", "s")
    deep = _nested(6)
    limited = pipeline.process(deep, processed_header="X", received=b"", signature=sig, limits=cfg.mime_limits)
    assert str(limited.decision) == "pass-through(malformed:nesting-too-deep)"
    default = pipeline.process(deep, processed_header="X", received=b"", signature=sig)
    assert default.decision.action == "stamped"


def test_production_example_config_is_valid(tmp_path: Path, pki_dir: Path) -> None:
    """deploy/relay.example.toml loads as shipped (with a tenant and certificates next to it)."""
    import shutil

    repo = Path(__file__).resolve().parents[2]
    shutil.copy(repo / "deploy" / "relay.example.toml", tmp_path / "relay.toml")
    shutil.copytree(pki_dir, tmp_path / "certs")
    (tmp_path / "certs" / "chain.pem").write_bytes((pki_dir / "ca.crt").read_bytes())
    shutil.copytree(repo / "rules", tmp_path / "rules")
    shutil.copytree(repo / "signatures", tmp_path / "signatures")
    (tmp_path / "rules" / "contoso" / "tenant.toml").write_text(
        (tmp_path / "rules" / "contoso" / "tenant.toml").read_text().replace(
            'endpoint = "127.0.0.1:2526"', 'endpoint = "mx:contoso.onmicrosoft.com"'))
    cfg = config.load(tmp_path / "relay.toml")
    assert [str(n) for n in cfg.security.allowed_networks] == list(config.EXO_NETWORKS)
    assert cfg.tenants[0].bind_by_sender_domain is False
    assert cfg.tenants[0].endpoint == config.Endpoint("mx", "contoso.onmicrosoft.com", 25)
    assert cfg.tenants[0].certificate_name == "contoso-7q4k2m.smtp.sigrelay.example.com"
    from relay.smtp import tls

    tls.server_context(cfg.tls)  # cert + key + separate chain load


def test_event_loop_choice(tmp_path: Path, pki_dir: Path) -> None:
    """[service] event_loop: "auto" by default; a wrong word, or uvloop with an implicit-TLS
    listener (relay.eventloop says why), stops start-up naming file, key and reason."""
    p = write(tmp_path, pki_dir)
    base = p.read_text()
    assert config.load(p).event_loop == "auto"
    svc = 'service_domain = "signature-relay.test"'
    p.write_text(base.replace(svc, f'{svc}\nevent_loop = "asyncio"'))
    assert config.load(p).event_loop == "asyncio"
    p.write_text(base.replace(svc, f'{svc}\nevent_loop = "libuv"'))
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert (e.value.file, e.value.key) == (str(p), "service.event_loop")
    assert "must be one of auto, asyncio, uvloop" in e.value.reason
    implicit = base.replace("idle_timeout = 30", 'idle_timeout = 30\nimplicit_tls = ["127.0.0.1:1465"]')
    p.write_text(implicit.replace(svc, f'{svc}\nevent_loop = "uvloop"'))
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert (e.value.file, e.value.key) == (str(p), "service.event_loop")
    assert "implicit_tls" in e.value.reason
    p.write_text(implicit)  # "auto" with an implicit-TLS listener: loads, and serves on asyncio's loop
    assert any(lst.implicit_tls for lst in config.load(p).listeners)


def test_event_loop_install() -> None:
    """What `serve` installs for each choice (uvloop is a dependency, so "auto" finds it)."""
    import asyncio

    import uvloop

    from relay import eventloop

    before = asyncio.get_event_loop_policy()
    try:
        assert eventloop.install("auto").startswith("uvloop ")
        assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
        assert eventloop.install("auto", implicit_tls=True) == "asyncio"
        assert not isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
        assert eventloop.install("uvloop").startswith("uvloop ")
        assert eventloop.install("asyncio") == "asyncio"
        assert type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy
        with pytest.raises(ValueError, match="implicit-TLS"):
            eventloop.install("uvloop", implicit_tls=True)
    finally:
        asyncio.set_event_loop_policy(before)


def test_a_worker_serves_the_sockets_its_supervisor_bound(tmp_path: Path, pki_dir: Path) -> None:
    """``serve --workers``: the supervisor binds every listener once (bind_sockets) and hands each
    worker the descriptors by listener address (--listen-fds); the worker serves exactly those, and
    a listener the supervisor did not bind (the config changed since it started) stops the worker
    naming the key, instead of serving the wrong socket."""
    import asyncio
    import dataclasses
    import socket

    from relay import supervisor
    from relay.service import Relay
    from relay.smtp.server import bind_sockets

    cfg = config.load(write(tmp_path, pki_dir))
    fds = bind_sockets(cfg.listeners)
    try:
        arg = supervisor.fds_arg(cfg, fds)
        worker = supervisor.worker_config(cfg, 1, 0, arg)
        assert [addr for addr, _ in worker.listen_sockets] == [(lst.host, lst.port) for lst in cfg.listeners]
        assert [list(group) for _, group in worker.listen_sockets] == fds
        v6 = supervisor.worker_config(cfg, 0, 0, "::|2525=7,8;0.0.0.0|25=9")
        assert v6.listen_sockets == ((("::", 2525), (7, 8)), (("0.0.0.0", 25), (9,)))
        for group in fds:  # listening already: a client connects before any worker serves
            for fd in group:
                with socket.socket(fileno=os.dup(fd)) as s, socket.create_connection(s.getsockname()[:2], 2):
                    pass
        moved = dataclasses.replace(worker, listeners=(dataclasses.replace(cfg.listeners[0], port=1),))
        with pytest.raises(ConfigError) as e:
            asyncio.run(Relay(moved).start())
        assert e.value.key == "listen" and "not a socket the supervisor bound" in e.value.reason
    finally:
        for group in fds:
            for fd in group:
                os.close(fd)
