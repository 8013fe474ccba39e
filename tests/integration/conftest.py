"""The integration tree (flows, CLI subprocesses, the stack): one real Prefect server for the session.

Only this tree starts Prefect; tests/unit/ tests the core alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_backend():
    """One real Prefect server for the whole session (the test harness), analytics off."""
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()  # subprocesses and Dask workers use it too
        try:
            yield
        finally:
            os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(autouse=True)
def prefect_console_follows_capture():
    """Prefect's console handlers keep the stream they were built with; point them at this test's
    captured stderr, or they write into the closed capture of an earlier test."""
    import logging
    import sys

    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, PrefectConsoleHandler):
                h.stream = sys.stderr
                h.console.file = sys.stderr
    yield


@contextmanager
def pipeline_workspace(root: Path) -> Iterator[pytest.MonkeyPatch]:
    """cwd = root (fishmerge's ./.fishmerge caches), no tracking URI from the environment, MLflow HTTP
    retries bounded, one torch thread (tiny models: intra-op threads only spin); all undone after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            mp.delenv(var, raising=False)
        # registry.check_reachable sets these process-wide (setdefault): set here so they are undone after
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        try:
            yield mp
        finally:
            torch.set_num_threads(threads)
