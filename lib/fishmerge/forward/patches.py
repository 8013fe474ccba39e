"""A change to a model's forward that holds while any caller is inside it, undone when the last one leaves.

Scoring and Fisher estimation change how a model computes (a cut last layer, another matrix-product
kernel) only inside a `with`. The same model can be used by two threads at once (a search's scorer,
a test), so each change is counted per model under a lock: it is applied by the first caller and
undone by the last, error or not.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class ModelPatch:
    """`applies(model)` says whether the change fits this model now; `apply(model)` makes it, `undo(model)`
    takes it back. Both run under the patch's lock, once per model however many callers are inside."""

    def __init__(
        self,
        applies: Callable[[torch.nn.Module], bool],
        apply: Callable[[torch.nn.Module], None],
        undo: Callable[[torch.nn.Module], None],
    ):
        self.applies, self.apply, self.undo = applies, apply, undo
        self._lock = threading.Lock()
        self._users: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> callers inside now

    @contextmanager
    def active(self, model: torch.nn.Module) -> Iterator[bool]:
        """While inside, the change holds for `model` (yields True), or the model is left as it is (False)."""
        with self._lock:
            on = self._users.get(model, 0) > 0 or self.applies(model)
            if on:
                if self._users.get(model, 0) == 0:
                    try:
                        self.apply(model)
                    except BaseException:
                        self.undo(model)  # a change made halfway is taken back
                        raise
                self._users[model] = self._users.get(model, 0) + 1
        try:
            yield on
        finally:
            if on:
                with self._lock:
                    self._users[model] -= 1
                    if self._users[model] == 0:
                        self.undo(model)
