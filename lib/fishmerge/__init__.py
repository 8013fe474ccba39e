"""fishmerge core: Fisher estimation, Fisher store, checkpoint I/O. Never imports Prefect."""

__version__ = "0.1.0"
