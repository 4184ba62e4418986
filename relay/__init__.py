"""signature-relay: server-side email signatures for Exchange Online, self-hosted."""

__version__ = "0.1.0"
