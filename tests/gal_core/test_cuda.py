"""CUDA paths (skipped on machines without a GPU): the step never synchronises with the host."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gal_core import GradientAdjuster

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amp", [False, True])
def test_step_makes_no_host_sync(amp, compute_dtype):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).cuda()
    adjuster = GradientAdjuster(10, (100, 32, 16), ratio=0.01, compute_dtype=compute_dtype).cuda()
    x, target = torch.randn(128, 32, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    loss_fn = lambda z: F.cross_entropy(z, target)  # noqa: E731
    per_sample = lambda z: F.cross_entropy(z, target, reduction="none")  # noqa: E731

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        return adjuster.backward(out, loss_fn, 0.1, per_sample_loss_fn=per_sample)

    step()  # first call allocates and initialises lazily
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v == v for v in stats.to_dict().values())
