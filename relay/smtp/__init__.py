"""Thin aiosmtpd layer: TLS contexts, limits, tenant binding hooks, error → reply mapping."""
