"""Building blocks from the course: BnLayer (the course's batch norm), concat pooling, the head."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5  # BnLayer's, as the course's


class BnLayer(nn.Module):
    """Conv -> ReLU -> the course's batch norm: learned per-channel add `a` and multiply `m`.
    Unlike the course version it keeps running statistics and uses them in eval mode, so
    predictions do not depend on what else is in the batch. With `sync` (train.sync_bn) the
    statistics cover every process's share of the batch, as torch's SyncBatchNorm does for
    nn.BatchNorm2d; it works on gloo (CPU) as well as NCCL.

    The norm itself is torch's fused F.batch_norm with `m` and `a` as its weight and bias (the
    course wrote it out as `(x - mean) / (var + eps).sqrt() * m + a`, several kernels and as
    many saved activations; the same numbers to float rounding). Two things stay the course's:
    the running variance follows the biased batch variance (torch's BatchNorm2d follows the
    unbiased one), and the parameters and buffers keep their (C, 1, 1) shapes and names, so
    checkpoints of earlier runs load."""

    sync: bool = False

    def __init__(self, ni: int, nf: int, stride: int = 2, kernel_size: int = 3, momentum: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(ni, nf, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.a = nn.Parameter(torch.zeros(nf, 1, 1))
        self.m = nn.Parameter(torch.ones(nf, 1, 1))
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(nf, 1, 1))
        self.register_buffer("running_var", torch.ones(nf, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        if not self.training:
            return F.batch_norm(
                x,
                self.running_mean.view(-1),
                self.running_var.view(-1),
                self.m.view(-1),
                self.a.view(-1),
                False,
                0.0,
                EPS,
            )
        n = x.numel() // x.shape[1]  # values per channel
        across = self.sync and dist.is_initialized() and dist.get_world_size() > 1
        if across or n < 2:
            # across processes (the all-reduces carry the gradients), or one value a channel
            # (which F.batch_norm refuses in training): written out
            mean, var = batch_stats(x, across)
            self._update_running(mean, var)
            return (x - mean) / (var + EPS).sqrt() * self.m + self.a
        # the batch's statistics come back from the fused kernel itself, with no pass of their
        # own: it writes them into fresh zero buffers with momentum 1 (the mean, and the
        # unbiased variance, rescaled here to the biased one the course's running average uses)
        mean = torch.zeros(x.shape[1], dtype=self.running_mean.dtype, device=x.device)
        var = torch.zeros_like(mean)
        out = F.batch_norm(x, mean, var, self.m.view(-1), self.a.view(-1), True, 1.0, EPS)
        self._update_running(mean.view(-1, 1, 1), var.view(-1, 1, 1) * ((n - 1) / n))
        return out

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)


def batch_stats(x: torch.Tensor, across_processes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance, (C, 1, 1), over N, H, W; across_processes: over
    every process's batch. Two passes (the mean, then squared deviations from it) keep the
    variance as exact as one process computing it; the all-reduces carry gradients both ways."""
    if not across_processes:
        return x.mean(dim=(0, 2, 3), keepdim=True)[0], x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)[0]
    count = x.new_tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=torch.float32)
    sums = dist_fn.all_reduce(torch.cat([x.float().sum(dim=(0, 2, 3)), count]))
    mean = (sums[:-1] / sums[-1]).view(-1, 1, 1)
    squares = dist_fn.all_reduce((x.float() - mean).pow(2).sum(dim=(0, 2, 3)))
    var = (squares / sums[-1]).view(-1, 1, 1)
    return mean.to(x.dtype), var.to(x.dtype)


class ResnetLayer(BnLayer):
    """A BnLayer with an identity shortcut (stride 1, same width)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class AdaptiveConcatPool2d(nn.Module):
    """Average and max pooling side by side: the head sees both summaries (fastai's default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.adaptive_max_pool2d(x, 1), F.adaptive_avg_pool2d(x, 1)], 1)


def is_norm(module: nn.Module) -> bool:
    """Batch-norm-like layers: anything that keeps running statistics."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, BnLayer)


def head(n_features: int, n_out: int, ps: float = 0.5, hidden: int = 512) -> nn.Sequential:
    """fastai's head for a pretrained body: concat pool, BN, dropout, linear, ReLU, BN, dropout, linear."""
    return nn.Sequential(
        AdaptiveConcatPool2d(),
        nn.Flatten(),
        nn.BatchNorm1d(2 * n_features),
        nn.Dropout(ps / 2),
        nn.Linear(2 * n_features, hidden),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden),
        nn.Dropout(ps),
        nn.Linear(hidden, n_out),
    )
