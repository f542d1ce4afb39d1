"""The engine's reductions across ranks, on gloo with 2 CPU processes: the confusion matrix sums
the ranks' counts, and all-reduce BatchNorm with half batches reproduces one full-batch BatchNorm
(outputs, input gradients, parameter gradients, running statistics).

One pair of spawned ranks runs every check (a spawned process costs ~2.5 s of CPU in imports);
each test reads its part of what the ranks sent back.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from process_helpers import free_port
from torch import nn

from fusionzoo.engine.sync_bn import AllReduceBatchNorm, convert_sync_batchnorm
from fusionzoo.tasks import ConfusionMatrix

# a 2x3 label image: rank 0 sees its first row, rank 1 its second; 255 is ignored
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
    r = torch.randn(4, 3, 5, 5, generator=g)
    return x, r


def _confusion(rank: int) -> list[list[int]]:
    cm = ConfusionMatrix(3)
    cm.update(PRED[:, rank : rank + 1], TARGET[:, rank : rank + 1])
    cm.all_reduce()
    return cm.matrix.tolist()


def _batchnorm(rank: int) -> tuple:
    torch.manual_seed(0)
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))[0]
    assert isinstance(bn, AllReduceBatchNorm)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x, r = _data()
    xs = x[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
    y = bn(xs)
    (y * r[2 * rank : 2 * rank + 2]).mean().backward()
    grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
    for gr in grads:  # what DDP does to parameter gradients
        dist.all_reduce(gr)
        gr /= 2
    # plain numpy copies: tensors in a queue are shared-memory handles that die with the process
    return (y.detach().numpy().copy(), (xs.grad / 2).numpy().copy(), [g.numpy().copy() for g in grads],
            bn.running_mean.numpy().copy(), bn.running_var.numpy().copy())


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        queue.put((rank, {"confusion": _confusion(rank), "batchnorm": _batchnorm(rank)}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> dict[int, dict]:
    """What each of the 2 ranks sent back, by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_all_reduce_sums_ranks(ranks):
    single = ConfusionMatrix(3)
    single.update(PRED, TARGET)
    assert ranks[0]["confusion"] == ranks[1]["confusion"] == single.matrix.tolist()


def test_two_ranks_equal_one_full_batch(ranks):
    def as_tensors(item):
        return (torch.from_numpy(item[0]), torch.from_numpy(item[1]), [torch.from_numpy(g) for g in item[2]],
                torch.from_numpy(item[3]), torch.from_numpy(item[4]))

    res = {rank: as_tensors(ranks[rank]["batchnorm"]) for rank in (0, 1)}
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x, r = _data()
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * r).mean().backward()
    y_ranks = torch.cat([res[0][0], res[1][0]])
    gx_ranks = torch.cat([res[0][1], res[1][1]])
    assert torch.allclose(y_ranks, y.detach(), atol=1e-5)
    assert torch.allclose(gx_ranks, x.grad, atol=1e-6)
    for rank in (0, 1):
        gw, gb = res[rank][2]
        assert torch.allclose(gw, bn.weight.grad, atol=1e-6) and torch.allclose(gb, bn.bias.grad, atol=1e-6)
        assert torch.allclose(res[rank][3], bn.running_mean, atol=1e-6)
        assert torch.allclose(res[rank][4], bn.running_var, atol=1e-5)


def test_single_process_and_eval_are_plain_batchnorm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3)
    ours = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))[0]
    x = torch.randn(4, 3, 5, 5)
    assert torch.allclose(ours(x), ref(x))
    ours.eval()
    ref.eval()
    assert torch.allclose(ours(x), ref(x))
    assert torch.equal(ours.running_mean, ref.running_mean)
