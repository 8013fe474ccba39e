"""numpy's huge-page advice is off inside `numpy_small_pages` (overlapping callers included), restored after,
and never touched when the user set NUMPY_MADVISE_HUGEPAGE."""

from __future__ import annotations

import threading

import pytest
from fishmerge.pipeline.huge_pages import numpy_small_pages
from numpy._core.multiarray import _set_madvise_hugepage

_reading = threading.Lock()


def advice() -> bool:
    """numpy's current setting, read by setting it and putting it back (one reader at a time)."""
    with _reading:
        value = _set_madvise_hugepage(True)
        _set_madvise_hugepage(value)
    return value


@pytest.fixture
def advice_on(monkeypatch):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    before = _set_madvise_hugepage(True)
    yield
    _set_madvise_hugepage(before)


def test_off_inside_restored_after_even_on_error(advice_on) -> None:
    with numpy_small_pages():
        assert advice() is False
        with numpy_small_pages():
            assert advice() is False
        assert advice() is False  # the outer caller is still inside
    assert advice() is True
    with pytest.raises(ValueError), numpy_small_pages():
        raise ValueError
    assert advice() is True


def test_overlapping_threads_restore_once_the_last_leaves(advice_on) -> None:
    entered, release = threading.Barrier(3), threading.Event()
    seen = []

    def search() -> None:
        with numpy_small_pages():
            entered.wait()
            release.wait()
            seen.append(advice())

    threads = [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    entered.wait()
    assert advice() is False
    release.set()
    for t in threads:
        t.join()
    assert seen == [False, False]  # each read it inside its own context, the other one leaving or not
    assert advice() is True


@pytest.mark.parametrize("value", ["0", "1"])
def test_the_users_choice_is_left_alone(monkeypatch, value) -> None:
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", value)
    before = _set_madvise_hugepage(value == "1")
    try:
        with numpy_small_pages():
            assert advice() is (value == "1")
    finally:
        _set_madvise_hugepage(before)
