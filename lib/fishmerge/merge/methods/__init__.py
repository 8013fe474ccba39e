"""Merge methods: one module per method, each registering itself (see `base` for what a method declares).

Importing this package registers the built-in methods; `METHODS` maps names to method objects.
"""

from fishmerge.merge.methods import fisher, isotropic, regmean, task_arithmetic, ties  # noqa: F401  (registration)
from fishmerge.merge.methods.base import (
    METHODS,
    MergeMethod,
    NoParams,
    Prepass,
    get_method,
    params_in_section,
    register_method,
)

__all__ = ["METHODS", "MergeMethod", "NoParams", "Prepass", "get_method", "params_in_section", "register_method"]
