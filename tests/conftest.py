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


@pytest.fixture(scope="session")
def server_models(tmp_path_factory):
    """A models folder with tiny sd1 and turbo pipelines, shared by the server tests."""
    from helpers import make_models_dir

    return make_models_dir(tmp_path_factory.mktemp("server_models"))
