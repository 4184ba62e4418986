"""When a PEM certificate expires, read without the ``cryptography`` package (issue #14: memory).

The serving process needs one fact from its certificates, ``notAfter``, for the expiry metric.
Importing ``cryptography.x509`` for it costs about 10 MB of RSS in every relay process (measured:
10.7 MB on import), more than a third of one 25 MB message. The field sits at a fixed place in
the DER encoding (RFC 5280 §4.1):

    Certificate  ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    TBSCertificate ::= SEQUENCE { [0] EXPLICIT version OPTIONAL, serialNumber INTEGER,
                                  signature AlgorithmIdentifier, issuer Name, validity Validity, ... }
    Validity ::= SEQUENCE { notBefore Time, notAfter Time }
    Time ::= UTCTime | GeneralizedTime

so this walks five TLVs and reads one time (§4.1.2.5: UTCTime years 50-99 are 19xx, 00-49 20xx;
both forms are in UTC, ending in "Z", with seconds). Anything else raises ValueError, which the
caller treats like an unreadable file. Certificate *generation* (``signature-relay certs``) still
uses ``cryptography``; ``tests/unit/test_x509time.py`` checks this reader against it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)


def _tlv(der: bytes, i: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at ``i``."""
    if i + 2 > len(der):
        raise ValueError("truncated DER")
    tag, n = der[i], der[i + 1]
    i += 2
    if n & 0x80:  # long form: the next n & 0x7f octets are the length (DER: no indefinite form)
        k = n & 0x7F
        if k == 0 or k > 4 or i + k > len(der):
            raise ValueError("bad DER length")
        n = int.from_bytes(der[i:i + k], "big")
        i += k
    if i + n > len(der):
        raise ValueError("truncated DER")
    return tag, i, i + n


def not_after(pem: bytes) -> dt.datetime:
    """The ``notAfter`` of the first certificate in ``pem`` (a chain file starts with the leaf)."""
    m = _PEM.search(pem)
    if m is None:
        raise ValueError("no PEM certificate")
    try:
        der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
    except binascii.Error as e:
        raise ValueError(f"bad base64: {e}") from e
    tag, start, _ = _tlv(der, 0)  # Certificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, i, _ = _tlv(der, start)  # TBSCertificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, _, end = _tlv(der, i)
    if tag == 0xA0:  # [0] EXPLICIT version
        i = end
        tag, _, end = _tlv(der, i)
    for want in (0x02, 0x30, 0x30):  # serialNumber, signature, issuer
        if tag != want:
            raise ValueError("unexpected TBSCertificate layout")
        i = end
        tag, _, end = _tlv(der, i)
    if tag != 0x30:  # Validity
        raise ValueError("unexpected TBSCertificate layout")
    _, v, _ = _tlv(der, i)
    _, _, after_nb = _tlv(der, v)  # notBefore
    tag, t0, t1 = _tlv(der, after_nb)  # notAfter
    text = der[t0:t1].decode("ascii")
    if tag == 0x17 and re.fullmatch(r"\d{12}Z", text):  # UTCTime YYMMDDHHMMSSZ
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif not (tag == 0x18 and re.fullmatch(r"\d{14}Z", text)):  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError(f"unexpected notAfter {text!r}")
    return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
