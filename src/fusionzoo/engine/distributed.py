"""torchrun-aware process-group setup, sharding and reductions.

``torchrun --nproc-per-node N train.py ...`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; the same script then runs DistributedDataParallel. Without
those variables everything here degrades to a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "EpochSampler",
    "SeededDataset",
    "all_gather_objects",
    "all_reduce_mean",
    "all_reduce_step",
    "all_reduce_sum_",
    "auto_threads",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "dist_info",
    "init_distributed",
    "is_main_process",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank facts from an initialized process group, else from torchrun's variables."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", str(dist.get_rank()))), dist.get_world_size())
    return DistInfo(
        int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    )


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> tuple[DistInfo, torch.device]:
    """Pick the device and, under torchrun, join the process group.

    Args:
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``. Under torchrun a
            CUDA process uses ``cuda:LOCAL_RANK``.

    Returns:
        The rank facts and this process's device. Backend: NCCL on CUDA, gloo on CPU.

    Raises:
        RuntimeError: CUDA was asked for but is not available.
    """
    info = dist_info()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was requested but CUDA is not available; use --device cpu")
        dev = torch.device("cuda", info.local_rank) if info.distributed or device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if info.distributed and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        info = dist_info()
    return info, dev


def auto_threads(requested: int | None = None) -> int:
    """CPU threads for this process: ``requested``, else the cores not already busy.

    On a shared machine, OpenMP threads that outnumber free cores spin against each other:
    measured here, ESANet-ResNet18 steps ran 4x *slower* with 2 threads than with 1 on a
    2-core machine with a load average of 6. So the default is the number of cores minus the
    1-minute load average, rounded (divided among local torchrun processes), at least 1.
    """
    if requested is not None:
        return requested
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # round, not floor: an idle machine's background load (0.1-0.4) must not cost a core
    return max(1, min(cores, round((cores - load) / local)))


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the only rank that writes files."""
    return dist_info().is_main


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float | torch.Tensor, device: torch.device | str = "cpu") -> float:
    """Mean of a scalar over ranks (the scalar itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    t = torch.as_tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / dist.get_world_size()


def all_reduce_step(loss: torch.Tensor, flag: bool, device: torch.device) -> tuple[float, bool]:
    """This step's loss averaged over ranks, and whether any rank raised ``flag``; one collective.

    Every rank takes the same decision from it: a NaN on one rank makes the mean NaN everywhere
    (all ranks stop before backward, none waits in DDP's gradient all-reduce), and a stop request
    (Ctrl-C / SIGTERM) seen by one rank stops all at the same step. Ranks hold equal batch sizes
    (``drop_last``), so the mean of per-rank means is the global batch mean.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(loss.detach()), bool(flag)
    dev = device if device.type == "cuda" else torch.device("cpu")  # gloo reduces CPU tensors
    t = torch.stack([loss.detach().float().reshape(()).to(dev), torch.tensor(float(flag), device=dev)])
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    total, flags = t.tolist()
    return total / dist.get_world_size(), flags > 0


def _reduce_device() -> torch.device:
    """Where collectives run: this rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: list[torch.Tensor], what: str = "state") -> None:
    """Sum each tensor over ranks, in place (nothing in a single process).

    Every rank must pass the same list: the same number of tensors with the same shapes and
    dtypes, in the same order. That is checked first (one small collective), so a mismatch
    raises on every rank, naming ``what``, instead of hanging in a collective.

    Args:
        tensors: float64 / int64 sums over this rank's share of the data.
        what: what they are, for the error message.

    Raises:
        RuntimeError: the ranks hold different lists.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    dev = _reduce_device()
    sig = torch.tensor([len(tensors), sum(t.numel() for t in tensors)], dtype=torch.float64, device=dev)
    lo, hi = sig.clone(), sig.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"{what}: the ranks hold different accumulator states (tensors, numbers: "
                           f"{lo.tolist()} to {hi.tolist()}); every rank must see at least one batch")
    for t in tensors:
        buf = t if t.device == dev else t.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (e.g. the run folder name chosen by rank 0)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class EpochSampler(torch.utils.data.Sampler[int]):
    """Seeded, resumable, rank-sharded sampler.

    The order of epoch ``e`` is a permutation drawn from ``seed + e`` (independent of any global
    RNG), split across ranks like ``DistributedSampler`` (rank ``r`` takes positions
    ``r, r + W, r + 2W, ...``), so the union of the ranks' ``s``-th batches is exactly the
    ``s``-th global batch of a single process running ``W`` times the per-rank batch size. The
    first ``skip`` samples of this rank are left out, which is how a run resumed mid-epoch
    continues with the very next batch without reading the skipped ones.

    Args:
        num_samples: dataset length.
        shuffle: permute (training) or keep order (evaluation).
        seed: base seed of the permutations.
        rank, world_size: this rank and the number of ranks.
        drop_last: drop the tail so every rank sees the same count (training); without it the
            tail is padded by wrapping around, as ``DistributedSampler`` does.
        even: ``False`` (evaluation) neither pads nor drops: ranks get ``order[r::W]``, so every
            sample is counted exactly once in metrics reduced across ranks.
        with_epoch: yield ``(epoch, index)`` pairs, for :class:`SeededDataset`, which derives each
            sample's augmentation seed from them.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        even: bool = True,
        with_epoch: bool = False,
    ) -> None:
        if num_samples < 1:
            raise ValueError("EpochSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.n = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.even = even
        self.with_epoch = with_epoch
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select epoch ``epoch``'s order and skip this rank's first ``skip`` samples."""
        self.epoch = epoch
        self.skip = skip

    def _per_rank(self) -> int:
        if not self.even:
            return len(range(self.rank, self.n, self.world_size))
        if self.drop_last:
            return self.n // self.world_size
        return -(-self.n // self.world_size)

    def rank_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if not self.even:
            return order[self.rank :: self.world_size]
        total = self._per_rank() * self.world_size
        if total > len(order):  # pad by wrapping so every rank gets the same count
            order = (order * (total // len(order) + 1))[:total]
        order = order[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        indices = self.rank_indices()[self.skip :]
        if self.with_epoch:
            return iter([(self.epoch, i) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        return max(self._per_rank() - self.skip, 0)


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that sample ``i`` of epoch ``e`` is always augmented identically.

    Random transforms draw from Python's, numpy's and torch's global generators. Seeding them
    per sample from ``(seed, epoch, index)`` makes the data stream independent of the number of
    loader workers, of the rank layout, and of where a run was interrupted and resumed, which is
    what exact resume and the DDP-equals-single-process check need. The caller's generator
    states are saved and restored around each sample, so the training RNG stream is untouched.

    Indexed with the ``(epoch, index)`` pairs of ``EpochSampler(with_epoch=True)``; a plain int
    index means epoch 0.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str):  # classes, palette, num_classes, ... of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        # A 63-bit mix of the three numbers (SplitMix-style constants) gives unrelated streams.
        s = (self.seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**63)
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(s)
            np.random.seed(s % (2**32))
            torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed would reseed CUDA too
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
