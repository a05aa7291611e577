"""Tests run offline on the CPU with one thread per process."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
