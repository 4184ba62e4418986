"""Development PKI: a dev CA, the relay's server certificate, the sink's, one client cert per tenant.

Production loads certificate, key and chain paths from config; this module only makes the dev
material a checkout needs (``signature-relay certs init``). Keys are written 0600 and never
overwritten without ``--force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.config import Config

_KEY_BITS = 2048  # RSA for interoperability: some MTAs still lack ECDSA support.


@dataclass(frozen=True)
class Issued:
    role: str
    cert_path: Path
    key_path: Path
    created: bool  # False: existed and was kept


class CertsError(Exception):
    pass


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "signature-relay dev"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn[:64]),
    ])


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def make_ca(days: int, cn: str = "signature-relay dev CA") -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey, names: Sequence[str], days: int,
    *, server: bool, client: bool,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """Issue a leaf certificate whose CN is the first name and whose SANs are all ``names``."""
    if not names:
        raise CertsError("a certificate needs at least one name")
    key = new_key()
    now = dt.datetime.now(dt.UTC)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with the final mode from the start (a key is never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def save(cert: x509.Certificate, key: rsa.RSAPrivateKey, cert_path: Path, key_path: Path) -> None:
    _write(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertsError(f"{key_path}: expected an RSA key")
    return cert, key


def names_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return [str(cn[0].value)] if cn else []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)]


def describe(cert: x509.Certificate) -> str:
    fp = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    return (f"names: {', '.join(names_of(cert))}\n"
            f"    expires: {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC\n"
            f"    sha256: {fp}")


def dev_pki_plan(cfg: Config) -> list[tuple[str, Path, Path, tuple[str, ...], bool, bool]]:
    """(role, cert, key, names, server usage, client usage) for every leaf of the dev PKI."""
    c = cfg.certs
    plan = [
        ("relay server", cfg.tls.cert, cfg.tls.key, c.server_names, True, False),
        ("tenant-inbound sink", cfg.sink.cert, cfg.sink.key, c.sink_names, True, False),
    ]
    for t in cfg.tenants:
        plan.append((f"tenant {t.name} client", t.client_cert, t.client_key, (t.certificate_name,), False, True))
    return plan


def init_dev_pki(cfg: Config, *, force: bool = False, missing_only: bool = False) -> list[Issued]:
    """Create the dev CA and every leaf. Refuses to overwrite unless ``force``.

    ``missing_only`` creates what is absent and keeps the rest (``make serve`` uses it, so adding
    a tenant later just issues that tenant's certificate).
    """
    c = cfg.certs
    plan = dev_pki_plan(cfg)
    paths = [(c.ca_cert, c.ca_key)] + [(p[1], p[2]) for p in plan]
    existing = [p for pair in paths for p in pair if p.exists()]
    if existing and not force and not missing_only:
        raise CertsError(
            "refusing to overwrite existing files (use --force to regenerate, "
            "--missing-only to create only what is absent):\n  " + "\n  ".join(map(str, existing)))
    out: list[Issued] = []
    ca_exists = c.ca_cert.exists() and c.ca_key.exists()
    if ca_exists and not force:
        ca_cert, ca_key = load_pair(c.ca_cert, c.ca_key)
        out.append(Issued("dev CA", c.ca_cert, c.ca_key, False))
    else:
        if missing_only and not force and any(p[1].exists() for p in plan):
            raise CertsError(
                f"{c.ca_cert} is missing but certificates it signed exist; "
                "run `signature-relay certs init --force` to rebuild the dev PKI")
        ca_cert, ca_key = make_ca(c.days)
        save(ca_cert, ca_key, c.ca_cert, c.ca_key)
        out.append(Issued("dev CA", c.ca_cert, c.ca_key, True))
    for role, cert_path, key_path, names, server, client in plan:
        if not force and cert_path.exists() and key_path.exists():
            out.append(Issued(role, cert_path, key_path, False))
            continue
        cert, key = issue(ca_cert, ca_key, names, c.days, server=server, client=client)
        save(cert, key, cert_path, key_path)
        out.append(Issued(role, cert_path, key_path, True))
    return out
