"""Tests run offline on the CPU with one thread per process."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """What module- and session-scoped fixtures cache (exports, native runtimes' verdicts)
    goes to a folder of the test run, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILENET_HOME", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Downloads and exported files go to a per-test cache, never the user's."""
    monkeypatch.setenv("MOBILENET_HOME", str(tmp_path_factory.mktemp("cache")))
