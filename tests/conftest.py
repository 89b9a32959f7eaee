"""Shared fixtures: seeds fixed, Pyro validation on, the bundled data."""

from __future__ import annotations

import pyro
import pytest
import torch

from elbolab.datasets import load_faithful


@pytest.fixture(autouse=True)
def _pyro_setup():
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def faithful() -> torch.Tensor:
    """Old Faithful, standardised (272, 2), float64."""
    return load_faithful().standardized().data
