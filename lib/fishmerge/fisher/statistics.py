"""The merge statistics one estimation pass can accumulate, named once (no torch: stores, plans and
configs read these names without loading the engine)."""

from __future__ import annotations

from collections.abc import Sequence

from fishmerge.errors import FishmergeError

FISHER, GRAM = "fisher", "gram"  # the diagonal Fisher; the input Grams of Linear layers (RegMean)
STATISTICS = (FISHER, GRAM)
LAYOUT_OUT_IN = "out_in"  # a Gram's weight as nn.Linear stores it: (out, in), y = x Wᵀ
LAYOUT_IN_OUT = "in_out"  # as HF Conv1D stores it: (in, out), y = x W


def check_statistics(statistics: Sequence[str]) -> tuple[str, ...]:
    """The statistics asked for, in canonical order; an unknown or empty list is refused."""
    unknown = [s for s in statistics if s not in STATISTICS]
    if unknown or not statistics:
        raise FishmergeError(
            f"unknown statistics {unknown or list(statistics)}: choose one or more of {', '.join(STATISTICS)}"
        )
    return tuple(s for s in STATISTICS if s in statistics)
