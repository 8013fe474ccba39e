"""numpy's huge-page advice off while the λ search merges candidates in memory.

On Linux numpy advises transparent huge pages (madvise) for every array of 4 MB or more. With the kernel's
default `defrag=madvise`, each fresh huge page is compacted and zeroed on demand, in the faulting thread.
The λ search merges a whole model into fresh arrays for every candidate and frees them after scoring, so
it pays that again and again: on the demo the isotropic and Fisher searches spent 18 s of system time,
against 3.6 s without the advice (82.4 s against 65.0 s of wall time, docs/benchmarks.md). The
out-of-core merge reuses its block buffers and ran faster with the advice, so it stays on elsewhere.
A user's NUMPY_MADVISE_HUGEPAGE, either way, is left as it is. The setting is process-wide: an out-of-core
merge running at the same time in this process also runs without the advice until the search ends.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # searches inside the context now (threads may overlap)
_saved = True  # numpy's setting before the first of them


@contextmanager
def numpy_small_pages() -> Iterator[None]:
    """Turn numpy's huge-page advice off until the last overlapping caller leaves, then restore it."""
    global _depth, _saved
    try:  # numpy's own switch (what NUMPY_MADVISE_HUGEPAGE sets at import): private, so a later numpy may lack it
        from numpy._core.multiarray import _set_madvise_hugepage
    except (ImportError, AttributeError):
        _set_madvise_hugepage = None
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ or _set_madvise_hugepage is None:
        yield
        return

    with _lock:
        if _depth == 0:
            _saved = _set_madvise_hugepage(False)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set_madvise_hugepage(_saved)
