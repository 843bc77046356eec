"""I/O against Redis. Stores know keys and scripts; they hold no business rules beyond the
atomic invariants their Lua scripts enforce (compare-and-set transitions, idempotency)."""
