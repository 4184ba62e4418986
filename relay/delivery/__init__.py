"""Delivery back to the tenant's inbound connector: MX resolution, TLS, connection pool, DSN."""
