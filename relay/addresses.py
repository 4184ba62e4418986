"""Domain names as the relay compares them: A-labels (RFC 5890), lower case. Pure.

Binding decides which tenant a message belongs to by comparing domains, so two spellings that
a mail system treats as one domain must compare equal, and a spelling that only *becomes* a
served domain through normalisation must not bind at all. ``str.lower()`` gets both wrong:
U+212A KELVIN SIGN lower-cases to "k", so ``alice@\\u212aontoso.com`` bound to ``kontoso.com``
(issue #10, finding 9), while a legitimate SMTPUTF8 domain like ``bücher.example`` never matched
its configured A-label ``xn--bcher-kva.example``.

    >>> normalise_domain("Bücher.Example.")
    'xn--bcher-kva.example'
    >>> normalise_domain("\\u212aontoso.com")
    Traceback (most recent call last):
    relay.addresses.BadDomain: '\\u212aontoso.com' is not in Unicode normal form C (lookalike characters)

How it fails: :class:`BadDomain`, with the reason, for a domain that is not a valid IDN
(UTS #46 processing, ``idna`` package) or that normalisation would silently change into another
domain: compatibility characters (fullwidth letters, U+212A), or a non-ASCII label that maps to
plain ASCII.
"""

from __future__ import annotations

import unicodedata

import idna


class BadDomain(ValueError):
    """Not a domain the relay will compare: invalid, or a lookalike that normalises into another."""


def normalise_domain(domain: str) -> str:
    """``domain`` as lower-case A-labels, trailing dot removed; raises :class:`BadDomain`."""
    d = domain.strip().rstrip(".")
    if d.isascii():
        return d.lower()
    if unicodedata.normalize("NFC", d) != d:
        raise BadDomain(f"{domain!r} is not in Unicode normal form C (lookalike characters)")
    if unicodedata.normalize("NFKC", d) != d:
        raise BadDomain(f"{domain!r} contains compatibility characters (e.g. fullwidth letters)")
    try:
        alabels = idna.encode(d, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as e:
        raise BadDomain(f"{domain!r} is not a valid internationalised domain name: {e}") from e
    for ulabel, alabel in zip(d.split("."), alabels.split("."), strict=False):
        if not ulabel.isascii() and not alabel.startswith("xn--"):
            raise BadDomain(f"{domain!r}: label {ulabel!r} turns into plain ASCII {alabel!r} under normalisation")
    return alabels
