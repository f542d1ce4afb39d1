from __future__ import annotations

import os

import pytest
import torch

# Tests never touch the network: timm/huggingface-hub must answer from the local cache or fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    CPU tests share 2 cores with other jobs: oversubscription made interpretation forwards ~20x slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
