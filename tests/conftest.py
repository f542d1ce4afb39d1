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


# The files that take longest, longest first (CPU seconds on one core, one torch thread, measured
# under load: test_models ~61, test_interpret_distributed ~32, test_detection ~30 ... test_parity_mlpd
# ~4.5; every other file takes less). `--dist loadfile` hands whole files to the xdist workers in
# collection order, each worker taking the next file as it runs out: started first, the long files
# leave the many short ones to even out the end (longest-processing-time-first scheduling), where
# alphabetical order had one worker start test_train_* last and finish ~13 s after the other.
# Reordering files changes no test. Keep the list roughly in order when a file grows or shrinks.
SLOWEST_FIRST = (
    "test_models.py", "test_interpret_distributed.py", "test_detection.py", "test_interpret_api.py",
    "test_interpret_detection.py", "test_train_ddp.py", "test_export.py", "test_train_report.py", "test_cli.py",
    "test_taps_after_fusion.py", "test_train_detection.py", "test_parity_cmnext.py", "test_predict.py",
    "test_interpret_compare.py", "test_silent_engine.py", "test_hub_push.py", "test_train_resume.py",
    "test_interpret_cooperation.py", "test_parity_cmx.py", "test_engine_distributed.py", "test_parity_sagate.py",
    "test_parity_mlpd.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the files of :data:`SLOWEST_FIRST` first, in that order; the rest keep their order (a stable sort)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
