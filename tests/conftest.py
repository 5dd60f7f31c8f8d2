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
