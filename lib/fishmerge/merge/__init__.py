"""Merging out of core: the config schema, the method registry, the plan (every input checked, the
cost estimated), the executor (Dask blocks, resumable, atomic), the output folder's metadata."""

from fishmerge.lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "MergeConfig": "config",
        "load_merge_config": "config",
        "METHODS": "methods",
        "MergeMethod": "methods",
        "get_method": "methods",
        "register_method": "methods",
        "MergePlan": "plan",
        "build_plan": "plan",
        "plan_for": "plan",
        "plan_from_config": "plan",
        "format_plan": "plan",
        "execute": "executor",
        "run_prepasses": "executor",
    },
)
