"""The fault-injection suite runs the benchmark's own functions (benchmarks/faults.py), so that what
`make test` checks and what `python benchmarks/faults.py --json` reports are the same code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "faults.py"


def _load():
    name = "fedfs_benchmarks_faults"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def bench():
    return _load()


@pytest.fixture(scope="session")
def folder(bench):
    with bench.backend("folder") as be:
        yield be


@pytest.fixture(scope="session")
def s3(bench):
    """A moto server owned by the suite (it is stopped and started again by the outage test)."""
    with bench.backend("s3") as be:
        yield be
