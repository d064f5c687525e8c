import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same seed, with the thread count of the reference machine."""
    torch.manual_seed(0)
    yield
