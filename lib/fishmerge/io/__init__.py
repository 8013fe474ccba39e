"""Input and output: storage (local paths and S3 URIs), safetensors (validated headers, row reads
and writes), model folders (configs, fingerprints, loading), datasets, and `safety` (what fishmerge
may write or remove)."""

from fishmerge.lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "tensor_index": "safetensors",
        "TensorRef": "safetensors",
        "load_model": "checkpoint",
        "model_fingerprint": "checkpoint",
        "cached_model_fingerprint": "checkpoint",
        "read_model_config": "checkpoint",
        "load_split": "data",
        "encode": "data",
    },
)
