"""Reading a merge's inputs by rows: model and base tensors (safetensors), Fishers (Zarr), in the
blocks the executor, the pre-passes and the λ search share; every value checked finite."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from fishmerge.errors import FishmergeError
from fishmerge.fisher.statistics import FISHER
from fishmerge.fisher.store import FisherReader, store_version
from fishmerge.io.safetensors import read_rows

if TYPE_CHECKING:  # the plan's type only: methods (imported by the plan) read rows through this module
    from fishmerge.merge.plan import MergePlan


def row_blocks(rows: int, row_elems: int, block_elems: int, align: int = 1) -> list[tuple[int, int]]:
    """Row ranges of at most block_elems elements, aligned to `align` rows (Fisher chunk rows) when possible."""
    per = max(1, block_elems // max(row_elems, 1))
    if align > 1:
        per = (per // align) * align if per >= align else max(1, align // -(-align // per))
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


def check_finite(values: np.ndarray, problem: str, fix: str) -> None:
    """Every number that reaches an output tensor is finite: stop the merge (nothing at the output) otherwise."""
    if not np.isfinite(values).all():
        raise FishmergeError(f"{problem}: {fix}. Nothing was written at the output.")


def check_input_finite(values: np.ndarray, who: str, key: str) -> np.ndarray:
    """Input tensor values as read, refused (naming the model and tensor) when any is NaN/Inf."""
    check_finite(values, f"{who} has NaN/Inf in '{key}'", "fix or re-save that checkpoint")
    return values


def read_input_rows(ref, r0: int, r1: int, who: str, key: str) -> np.ndarray:
    """Rows [r0, r1) of an input tensor as float32 (0-d tensors as a scalar array), checked finite."""
    values = check_input_finite(read_rows(ref, r0, r1), who, key)
    return values if ref.shape else values.reshape(())


def model_rows(plan: MergePlan, m_index: int, key: str, r0: int, r1: int) -> np.ndarray:
    """Rows of merged tensor `key` of model `m_index`."""
    m = plan.models[m_index]
    return read_input_rows(m.refs[key], r0, r1, f"input model '{m.name}'", key)


def base_rows(plan: MergePlan, key: str, r0: int, r1: int) -> np.ndarray:
    """The base model's rows of merged tensor `key` (under its own key in the base checkpoint)."""
    return read_input_rows(plan.base.refs[plan.base_keys[key]], r0, r1, "the base model", key)


_fisher_readers: dict[str, tuple[object, FisherReader]] = {}
_fisher_lock = threading.Lock()


def fisher_reader(uri: str) -> FisherReader:
    """Fisher stores opened once per process (Dask workers included), again when a local store was
    replaced since (e.g. completed by its Grams)."""
    version = store_version(uri)
    with _fisher_lock:
        cached = _fisher_readers.get(uri)
        if cached is None or cached[0] != version:
            _fisher_readers[uri] = (version, FisherReader(uri))
        return _fisher_readers[uri][1]


def fisher_rows(plan: MergePlan, m_index: int, key: str, r0: int, r1: int) -> np.ndarray:
    """Rows of model `m_index`'s Fisher of `key`, checked finite."""
    m = plan.models[m_index]
    values = fisher_reader(m.fisher).rows(key, r0, r1)
    if not np.isfinite(values).all():
        raise FishmergeError(
            f"the Fisher store '{m.fisher}' of model '{m.name}' holds NaN/Inf in '{key}': recompute the Fisher "
            "(NaN Fishers usually mean NaN logits: check the model and data). Nothing was written at the output."
        )
    return values.reshape((r1 - r0, *m.refs[key].shape[1:]) if m.refs[key].shape else ())


def gram_mean(plan: MergePlan, m_index: int, key: str) -> np.ndarray:
    """Model `m_index`'s mean input Gram Σxxᵀ/tokens of weight `key` (fp64), checked finite."""
    m = plan.models[m_index]
    entry = m.grams[key]
    reader = fisher_reader(m.fisher)
    width = reader.group[entry["array"]].shape[0]
    values = reader.rows(entry["array"], 0, width).astype(np.float64)
    if not np.isfinite(values).all():
        raise FishmergeError(
            f"the store '{m.fisher}' of model '{m.name}' holds NaN/Inf in the Gram of '{key}': recompute it. "
            "Nothing was written at the output."
        )
    values /= float(entry["tokens"])
    return values


class Grams:
    """The models' mean Grams of one weight, each read when it is reached (one in memory at a time)."""

    def __init__(self, plan: MergePlan, key: str):
        self.plan, self.key = plan, key

    def __len__(self) -> int:
        return len(self.plan.models)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return gram_mean(self.plan, i, self.key)


def merge_blocks(plan: MergePlan, key: str) -> list[tuple[int, int]]:
    """The row blocks of merged tensor `key`: fitted to the memory budget, aligned to the Fishers' chunks;
    a tensor merged by its Grams in blocks of the rows the planner fitted (a Conv1D's: all of them)."""
    ref = plan.models[0].refs[key]
    if key in plan.gram_layouts:
        return row_blocks(ref.rows, ref.row_elems, plan.gram_rows[key] * ref.row_elems)
    align = 1
    if FISHER in plan.statistics:
        arr = fisher_reader(plan.models[0].fisher).group[key]
        align = int(arr.chunks[0]) if arr.ndim else 1
    return row_blocks(ref.rows, ref.row_elems, plan.block_elems, align)
