"""A run's state: its folder (layout owner), plan, round ledger and health."""
