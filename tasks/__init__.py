"""Prefect tasks: thin wrappers over `lib` (filled in as flows need them)."""
