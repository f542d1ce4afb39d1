from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never touch the network: timm/huggingface-hub must answer from the local cache or fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Torch threads per test process: the cores (at most 2) shared among pytest-xdist's workers, so
# `-n auto` does not oversubscribe the CPU.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


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


def shared_data_dir() -> Path:
    """Real sample data (read-only, never in the repository): ``$FUSIONZOO_SHARED_DATA``, else
    ``<repo>/../shared/data`` (CI checks the repository out beside ``shared/``)."""
    env = os.environ.get("FUSIONZOO_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """:func:`shared_data_dir` (tests skip when the folder they need is absent)."""
    return shared_data_dir()


@pytest.fixture(scope="session")
def kaist_eval(shared_data: Path) -> Path:
    """``<shared>/kaist-eval``: KAIST improved test annotations and MLPD's published detections."""
    root = shared_data.parent / "kaist-eval"
    if not (root / "KAIST_annotation.json").is_file() or not (root / "MLPD_result.txt").is_file():
        pytest.skip(f"{root} is absent (KAIST known answer; set FUSIONZOO_SHARED_DATA to <shared>/data)")
    return root
