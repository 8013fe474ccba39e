"""Diagonal Fisher estimation: the engine (per-example squared gradients at backprop cost), the
estimators, the options, resumable content-addressed jobs, the Zarr store (format v1), reports."""

from fishmerge.lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "FisherAccumulator": "engine",
        "FisherOptions": "options",
        "FisherSpec": "job",
        "resolve": "job",
        "existing_store": "job",
        "compute_shard": "job",
        "finish": "job",
        "FisherReader": "store",
        "open_fisher_store": "store",
        "write_fisher_store": "store",
        "inspect_store": "report",
        "tensor_stats": "report",
    },
)
