"""Prefect flows and the `fishmerge` command line."""
