"""Shared fixtures of the test suite."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Keep tests reproducible and light on a 2-core machine."""
    torch.manual_seed(0)
    yield
