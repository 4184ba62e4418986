"""Exchange Online connectors and transport rule: plan, apply, check, remove (the setup wizard)."""
