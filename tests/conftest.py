"""Test fixtures only; shared builders and comparisons live in helpers.py."""

import pytest


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass
    yield
