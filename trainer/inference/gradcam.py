"""Grad-CAM (Selvaraju et al. 2017), the class activation map the course draws over images:
weigh each channel of the last convolutional block by the mean gradient of the class score
with respect to it, keep the positive part, and scale it up to the image."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """(N, H, W) maps in [0, 1] at the input's size; target: a class per image (default: the
    predicted one, i.e. where the model looked for what it decided)."""
    acts: dict = {}
    hook = layer.register_forward_hook(lambda m, i, out: acts.__setitem__("a", out))
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)  # activations need a graph even if frozen
            out = model(x)
            if target is None:
                target = out.argmax(1)
            score = out.gather(1, target.view(-1, 1).to(out.device)).sum()
            (grad,) = torch.autograd.grad(score, acts["a"])
    finally:
        hook.remove()
        model.train(was)
    a = acts["a"].detach()
    cam = F.relu((grad.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).cpu()
