"""Synchronized BatchNorm for any process-group backend (gloo on CPU included).

``torch.nn.SyncBatchNorm`` only runs on GPUs. Segmentation recipes train with batch statistics
over the *global* batch (CMX, SA-Gate and ESANet all use synchronized BN), and a CPU ``torchrun``
run should compute what one process with the global batch computes. This module does it with a
differentiable all-reduce of per-channel sums (``sum x`` and the count, then ``sum (x - mean)^2``),
from which mean and (biased) variance follow; autograd's backward of the all-reduce sums the statistics'
gradients over ranks, which is exactly the gradient of the global-batch normalization.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["AllReduceBatchNorm", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover every rank's batch (any device, any backend).

    Outside training, or without an initialized process group of more than one rank, it is an
    ordinary BatchNorm. Inputs ``(B, C, *)``; computation in float32.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"AllReduceBatchNorm expects (B, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and distributed):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.full((1,), x.numel() / c, dtype=torch.float32, device=x.device)
        # Two passes (global mean, then global sum of squared deviations) rather than
        # E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std (post-ReLU features)
        # and would make a distributed run drift from a single-process one.
        first = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        n = first[-1]
        mean = first[:c] / n
        shape = [1, c] + [1] * (x.dim() - 2)
        centered = xf - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        y = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d in ``module`` by :class:`AllReduceBatchNorm` (same state)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        new = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                new.weight = module.weight
                new.bias = module.bias
        if module.track_running_stats:
            new.running_mean = module.running_mean
            new.running_var = module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
