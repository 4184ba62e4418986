"""relay/x509time.py: the expiry the metric reports is the one ``cryptography`` reads, for the
project's own certificates and for the encodings RFC 5280 allows (UTCTime and GeneralizedTime,
v1 and v3, short and long lengths); anything else is a ValueError, never a wrong date."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import x509time

KEY = ec.generate_private_key(ec.SECP256R1())


def make(not_after: dt.datetime, *, v1: bool = False, cn: str = "x", serial: int = 1) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    before = min(dt.datetime(2020, 1, 1, tzinfo=dt.UTC), not_after - dt.timedelta(days=1))
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(KEY.public_key())
         .serial_number(serial).not_valid_before(before).not_valid_after(not_after))
    if not v1:
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    cert = b.sign(KEY, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


@settings(max_examples=60, deadline=None)
@given(st.datetimes(min_value=dt.datetime(1950, 1, 2), max_value=dt.datetime(9999, 12, 31, 23, 59, 59)),
       st.text(alphabet="abcdefghij", min_size=1, max_size=300), st.integers(min_value=1, max_value=2**159 - 1))
def test_same_expiry_as_cryptography(when: dt.datetime, cn: str, serial: int) -> None:
    """Years on both sides of 2050 (UTCTime until 2049, GeneralizedTime from 2050, RFC 5280
    §4.1.2.5), long subject names (long-form lengths) and serial numbers of every size."""
    pem = make(when.replace(microsecond=0, tzinfo=dt.UTC), cn=cn, serial=serial)
    assert x509time.not_after(pem) == x509.load_pem_x509_certificate(pem).not_valid_after_utc


@pytest.mark.parametrize("when", [
    dt.datetime(1950, 1, 2, tzinfo=dt.UTC), dt.datetime(1959, 12, 31, 12, tzinfo=dt.UTC),
    dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC), dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
    dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC), dt.datetime(2050, 1, 1, tzinfo=dt.UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)])
def test_the_century_boundaries(when: dt.datetime) -> None:
    """UTCTime's two-digit years: 50-99 are 19xx, 00-49 are 20xx; 2050 on is GeneralizedTime."""
    pem = make(when)
    assert x509time.not_after(pem) == x509.load_pem_x509_certificate(pem).not_valid_after_utc == when


def test_the_project_certificates(deployment: object) -> None:
    certs = Path(deployment.root) / "certs"  # type: ignore[attr-defined]
    pems = sorted(certs.rglob("*.crt"))
    assert len(pems) >= 3
    for p in pems:
        pem = p.read_bytes()
        assert x509time.not_after(pem) == x509.load_pem_x509_certificate(pem).not_valid_after_utc, p


def test_a_chain_file_gives_the_leaf_and_a_v1_certificate_is_read() -> None:
    leaf, other = make(dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)), make(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
    assert x509time.not_after(leaf + other) == dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    v1 = make(dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC), v1=True)
    assert x509time.not_after(v1) == dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)


@pytest.mark.parametrize("pem", [
    b"", b"not a certificate",
    b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",  # an empty SEQUENCE
    b"-----BEGIN CERTIFICATE-----\nAgEB\n-----END CERTIFICATE-----\n",  # an INTEGER
])
def test_anything_else_is_a_value_error(pem: bytes) -> None:
    with pytest.raises(ValueError):
        x509time.not_after(pem)


def test_every_truncation_is_a_value_error() -> None:
    import base64
    import re

    pem = make(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    der = base64.b64decode(b"".join(re.search(rb"-----\n(.+)\n-----END", pem, re.S).group(1).split()))  # type: ignore[union-attr]
    for n in range(0, len(der) - 1, 7):
        cut = base64.encodebytes(der[:n])
        try:
            got = x509time.not_after(b"-----BEGIN CERTIFICATE-----\n" + cut + b"-----END CERTIFICATE-----\n")
        except ValueError:
            continue
        # a prefix long enough to hold the validity may still be read: then it must be right
        assert got == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def test_the_serving_process_does_not_load_cryptography() -> None:
    """What it is for: about 10 MB of RSS per relay process (issue #14)."""
    code = ("import sys, relay.cli, relay.service, relay.sink, relay.supervisor, relay.dircli, relay.metrics; "
            "print([m for m in sys.modules if m.split('.')[0] == 'cryptography'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
