"""Value types shared by the layers of the pure core: a rendered signature and its images.

:mod:`relay.signatures` produces them from templates, :mod:`relay.mime.stamper` consumes them; both
import them from here so neither depends on the other's internals. Frozen, no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Image:
    """An image the HTML signature embeds: referenced in it as ``src="cid:<name>"``."""

    name: str  # e.g. "logo.png"
    content_type: str  # e.g. "image/png"
    data: bytes


@dataclass(frozen=True)
class Signature:
    """A rendered signature: the HTML and plain-text forms and the images the HTML embeds."""

    html: str
    text: str
    images: tuple[Image, ...] = ()
