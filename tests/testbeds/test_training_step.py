"""The fixtures' optimiser step: ``clip`` bounds the gradients' global norm before the update
(fixture 2's answer stage diverged without it), and without ``clip`` they are left as computed."""
from __future__ import annotations

import torch

from tamp_fx.testbeds.fixture.train import cosine_schedule, optimiser_step


def _one_step(clip):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = torch.optim.SGD([w], lr=0.1)
    before = w.detach().clone()
    loss = 100 * (w ** 2).sum()                  # gradient 200 w: norm far above 1
    optimiser_step(opt, cosine_schedule(opt, 10, warmup=1), loss, clip=clip)
    return before, w.detach(), w.grad.norm().item()


def test_clip_bounds_the_gradient_norm_of_the_update():
    before, after, norm = _one_step(1.0)
    assert abs(norm - 1.0) < 1e-4
    assert torch.allclose(before - after, 0.1 * 200 * before / (200 * before).norm(), atol=1e-5)   # SGD: lr x clipped grad


def test_no_clip_leaves_the_gradient_as_computed():
    before, after, norm = _one_step(None)
    assert abs(norm - (200 * before).norm().item()) < 1e-2
