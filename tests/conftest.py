"""Shared fixtures: small configs that train in seconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Keep tests on 2 CPU cores predictable and quiet. Under pytest-xdist (the default, see
# pyproject.toml) each worker gets its share of the cores, it and the processes its tests start:
# two workers with two threads each on a 2-core machine would only contend.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
torch.set_num_threads(min(_THREADS, torch.get_num_threads()))


@pytest.fixture
def smoke_config():
    from tdc_core.config import load_config

    return load_config(preset="smoke")


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one BLAS thread for modules of tiny CPU workloads (8x8 images, small
    UNets, 64-d features): on 2 shared cores a second thread only adds synchronisation and,
    when the machine is busy, slows such work down several-fold."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files that hold a slow test run first; otherwise collection order is kept. pytest-xdist
    hands out whole files (``--dist loadfile``) in collection order, so a minutes-long file
    collected late (``test_study.py``) would run alone at the end while the other worker idles:
    longest first is the usual cure for that tail."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: order within a file is kept
