"""Shared fixtures: small model weights, and a scan processed once for the picture tests.

The helpers themselves live in `pipeline.testing` (the project's test kit), so that test modules
never import each other. The ONNX graphs workers export on first use (`models.backend` auto on a
CPU) go to one cache for the whole run, not the user's ~/.cache: set here, before the test
processes start, so they and every daemon and worker they start share it (one export per weights file),
and deleted when the run ends. A run needs a few GiB of temporary space at its peak (README); with less
it stops at once with one line saying so, not mid-run with dozens of ENOSPC errors.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.testing.configs import write_untrained_weights
from pipeline.testing.pictures import BuiltScan, build_processed_scan, make_truth_store

REPO = Path(__file__).resolve().parents[1]

# the suite held ~1.4 GiB of temporary files at its peak (two test processes, passing tests' files deleted; 2026-12-04):
# this leaves room to spare
NEEDED_TEMP_GIB = 3.0

OWNS_TEST_CACHE = "PIPELINE_TEST_CACHE" not in os.environ  # true in the first process (pytest's controller) only
if OWNS_TEST_CACHE:  # the test processes inherit it
    os.environ["PIPELINE_TEST_CACHE"] = tempfile.mkdtemp(prefix="pipeline-test-cache-")
    # the run's model cache goes with the run (each was ~470 MiB, and they once piled up until a disk was full); at
    # this process's exit, so also after a run that ended in a usage error, before any test
    atexit.register(shutil.rmtree, os.environ["PIPELINE_TEST_CACHE"], ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = os.environ["PIPELINE_TEST_CACHE"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to start on a disk too full to finish: the failures it would give name everything but the cause."""
    if hasattr(session.config, "workerinput"):
        return
    temp = Path(tempfile.gettempdir())
    free_gib = shutil.disk_usage(temp).free / 2**30
    if free_gib < NEEDED_TEMP_GIB:
        pytest.exit(f"only {free_gib:.1f} GiB free in {temp}; the tests need about {NEEDED_TEMP_GIB:.0f} GiB there "
                    "(set TMPDIR to a roomier disk, or free some space)", returncode=1)


@pytest.fixture(scope="session")
def untrained_weights(tmp_path_factory) -> dict[str, Path]:
    """Freshly initialised models in the shipped formats: for tests of the plumbing, not of accuracy."""
    return write_untrained_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def processed_scan(tmp_path_factory, untrained_weights) -> BuiltScan:
    """A small simulated scan run through `pipeline process` once per session (pictures, README snippets)."""
    return build_processed_scan(tmp_path_factory.getbasetemp() / "quicklook-scan", untrained_weights)


@pytest.fixture(scope="session")
def truth_store(tmp_path_factory, processed_scan) -> Path:
    """A copy of that scan's store with the simulator's true labels in it."""
    return make_truth_store(processed_scan, tmp_path_factory.getbasetemp() / "quicklook-truth")


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    """Debian's headless chromium through Selenium, one per test module (pipeline.testing.web.chromium)."""
    from pipeline.testing.web import chromium

    driver = chromium(tmp_path_factory.mktemp("chromium"))
    try:
        yield driver
    finally:
        driver.quit()
