"""Fisher store v1: contract, atomic replacement, validation on open."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from fishmerge.errors import FishmergeError
from fishmerge.fisher.store import open_fisher_store, read_fisher, write_fisher_store

ATTRS = {"estimator": "exact", "n_examples": 3, "model_fingerprint": "m", "data_fingerprint": "d"}


def test_roundtrip_plain_zarr(tmp_path) -> None:
    tensors = {
        "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "a.bias": np.ones(4, np.float32),
        "scalar": np.float32(2.0),
    }
    uri = write_fisher_store(str(tmp_path / "s.zarr"), tensors, ATTRS)
    g = zarr.open_group(uri, mode="r")
    assert g.metadata.zarr_format == 3
    assert set(g.array_keys()) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(g[k][...], v)
        assert g[k].compressors == ()
    assert g.attrs["format"] == "fishmerge.fisher" and g.attrs["n_examples"] == 3


def test_failed_write_keeps_the_old_store_and_leaves_nothing_aside(tmp_path) -> None:
    dest = tmp_path / "s.zarr"
    write_fisher_store(str(dest), {"x": np.ones(2, np.float32)}, ATTRS)
    with pytest.raises(FishmergeError, match="NaN"):
        write_fisher_store(str(dest), {"y": np.ones(2, np.float32), "x": np.array([1.0, np.nan])}, ATTRS)
    assert list(read_fisher(str(dest))) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_rewrite_replaces_atomically(tmp_path) -> None:
    dest = tmp_path / "s.zarr"
    write_fisher_store(str(dest), {"x": np.ones(2, np.float32)}, ATTRS)
    write_fisher_store(str(dest), {"y": np.zeros(3, np.float32)}, ATTRS)
    assert list(read_fisher(str(dest))) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_open_rejects_foreign_and_future_stores(tmp_path) -> None:
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.attrs["format"] = "something"
    with pytest.raises(FishmergeError, match="not a fishmerge Fisher store"):
        open_fisher_store(str(tmp_path / "plain.zarr"))
    uri = write_fisher_store(str(tmp_path / "v.zarr"), {"x": np.ones(1, np.float32)}, ATTRS)
    zarr.open_group(uri, mode="a").attrs["format_version"] = 99
    with pytest.raises(FishmergeError, match="format_version 99"):
        open_fisher_store(uri)
    with pytest.raises(FishmergeError, match="no Fisher store"):
        open_fisher_store(str(tmp_path / "missing.zarr"))


def test_a_store_holding_more_statistics_is_never_replaced_by_one_holding_fewer(tmp_path) -> None:
    """Two runs completing one store: the run committing last with fewer statistics keeps the fuller store."""
    from fishmerge.fisher.store import begin_store, commit_store, create_fisher_array, stored_attributes

    dest = str(tmp_path / "s.zarr")
    same = {**ATTRS, "estimation_id": "e1"}
    staging, group = begin_store(dest)
    create_fisher_array(group, "x", (2,))[...] = np.ones(2, np.float32)
    create_fisher_array(group, "gram/x", (2, 2))[...] = np.eye(2, dtype=np.float32)
    grams = {"x": {"array": "gram/x", "tokens": 3, "layout": "out_in"}}
    commit_store(staging, dest, group, {**same, "fisher_id": "fg", "statistics": ["fisher", "gram"], "grams": grams})
    write_fisher_store(dest, {"x": np.zeros(2, np.float32)}, {**same, "fisher_id": "e1"})  # Fisher only, later
    attrs = stored_attributes(dest)
    assert attrs["fisher_id"] == "fg" and attrs["format_version"] == 2
    assert read_fisher(dest)["x"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # the staged copy is gone
    # another estimation is still replaced as before
    write_fisher_store(dest, {"y": np.zeros(1, np.float32)}, {**ATTRS, "estimation_id": "e2"})
    assert list(read_fisher(dest)) == ["y"]
