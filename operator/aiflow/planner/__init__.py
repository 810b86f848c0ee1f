"""Cost model and placement/partition solver (pure functions)."""
