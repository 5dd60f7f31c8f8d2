"""Shared fixtures: small configs that train in seconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Keep tests on 2 CPU cores predictable and quiet.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


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
