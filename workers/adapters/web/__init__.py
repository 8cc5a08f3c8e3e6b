"""The web: the address guard, pinned downloads with deadlines, media probes, webhooks."""
