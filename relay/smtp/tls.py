"""TLS contexts for the SMTP listeners.

Exchange Online speaks TLS 1.2/1.3 with ECDHE AES-GCM; we offer only forward-secret AEAD suites
for TLS 1.2 (TLS 1.3 suites are all AEAD) and refuse TLS 1.0/1.1 (RFC 8996).
"""

from __future__ import annotations

import os
import ssl
import tempfile
import weakref
from pathlib import Path

from relay.config import TlsConfig
from relay.errors import ConfigError

# The server name a client asked for (SNI), per TLS connection. Exchange Online's use of SNI is
# not documented: when a per-tenant name is visible it must agree with the bound tenant (#5).
_SNI: weakref.WeakKeyDictionary[ssl.SSLObject | ssl.SSLSocket, str] = weakref.WeakKeyDictionary()


def _remember_sni(obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
    if name:
        _SNI[obj] = name.lower().rstrip(".")


def sni_of(ssl_info: dict[str, object] | None) -> str | None:
    obj = (ssl_info or {}).get("ssl_object")
    return _SNI.get(obj) if isinstance(obj, ssl.SSLObject | ssl.SSLSocket) else None


TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, chain: Path | None, where: str) -> None:
    try:
        if chain is None:
            ctx.load_cert_chain(str(cert), str(key))
            return
        # ssl loads a chain only from the certificate file itself: concatenate leaf + chain.
        with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as f:
            f.write(cert.read_bytes().rstrip(b"\n") + b"\n" + chain.read_bytes())
        try:
            ctx.load_cert_chain(f.name, str(key))
        finally:
            os.unlink(f.name)
    except FileNotFoundError as e:
        raise ConfigError(where, "cert/key", f"{e.filename}: file not found "
                          "(for the dev profile run `signature-relay certs init`)") from e
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(where, "cert/key", f"cannot load {cert} with key {key}: {e}") from e


def server_context(tls: TlsConfig, *, client_ca: Path | None = None, where: str = "tls") -> ssl.SSLContext:
    """Server-side context. With ``client_ca`` a client certificate is requested and, if
    presented, verified (CERT_OPTIONAL: the SMTP layer decides what a missing one means and
    answers with a proper reply instead of a failed handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    _load_chain(ctx, tls.cert, tls.key, tls.chain, where)
    ctx.sni_callback = _remember_sni
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(where, "client_ca", f"cannot load {client_ca}: {e}") from e
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def peer_names(peercert: object) -> list[str]:
    """DNS names of a verified peer certificate (``SSLSocket.getpeercert()`` dict): SANs, else CN."""
    if not isinstance(peercert, dict) or not peercert:
        return []
    sans = [v for k, v in peercert.get("subjectAltName", ()) if k == "DNS"]
    if sans:
        return sans
    return [v for rdn in peercert.get("subject", ()) for k, v in rdn if k == "commonName"]


def describe(ssl_info: dict[str, object] | None) -> str | None:
    """``"version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384"`` for the Received: field and the log."""
    if not ssl_info:
        return None
    obj = ssl_info.get("ssl_object")
    if isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        c = obj.cipher()
        return f"version={obj.version()} cipher={c[0] if c else 'unknown'}"
    return "tls"
