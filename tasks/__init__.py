"""Prefect tasks: thin wrappers over `lib` (they call the core and create Prefect artifacts).

Bad input is a `FishmergeError`, raised by the task like any other error, and:
- never retried: every task with retries takes `retry_condition_fn=not_bad_input`;
- logged as its one-line message (the traceback Prefect would log is dropped; a bug keeps its own);
- turned by the flow into one Failed state with that message (`fails_on_bad_input`).
"""

from __future__ import annotations

import functools
import inspect
import logging

from fishmerge.errors import FishmergeError


def _exception_of(state) -> BaseException | None:
    if isinstance(state.data, BaseException):
        return state.data
    try:
        found = state.result(raise_on_failure=False)
    except Exception:  # the result cannot be read back: not known to be bad input
        return None
    return found if isinstance(found, BaseException) else None


def not_bad_input(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task unless it failed on bad input (a
    FishmergeError), which no retry can fix."""
    return not isinstance(_exception_of(state), FishmergeError)


def fails_on_bad_input(fn):
    """Flow decorator (under `@flow`): a FishmergeError raised in the flow (by a task, a core call)
    ends it as one Failed state whose message is the error's one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from prefect.states import Failed

        try:
            return fn(*args, **kwargs)
        except FishmergeError as exc:
            return Failed(message=str(exc))

    # Prefect validates parameters against the signature, resolving names in the wrapper's module:
    # give it the flow's own signature with its types already resolved (in the flow's module)
    wrapper.__signature__ = inspect.signature(fn, eval_str=True)
    return wrapper


class _BadInputWithoutTraceback(logging.Filter):
    """Prefect logs a failed task run with its traceback; for bad input the message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FishmergeError):
            record.exc_info, record.exc_text = None, None
        return True


_task_log = logging.getLogger("prefect.task_runs")
if not any(isinstance(f, _BadInputWithoutTraceback) for f in _task_log.filters):
    _task_log.addFilter(_BadInputWithoutTraceback())
