"""Time-based credit rules: billing periods and plan allowances (reset, capped rollover, never
expire), trials and daily free credits, expiry, hold timeouts, and the scheduler that runs them
exactly once across processes."""
