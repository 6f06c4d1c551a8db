"""CUDA paths (skipped on machines without a GPU): eager, compiled and CUDA-graphed steps never synchronise with
the host, the graphed step really runs as CUDA graphs, and both compiled modes give the eager numbers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gal_core import GradientAdjuster

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
MODES = {"eager": False, "compiled": True, "graphed": "reduce-overhead"}  # -> GradientAdjuster(compile=...)


def problem(compute_dtype=torch.float32, compile=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).cuda()
    adjuster = GradientAdjuster(10, (100, 32, 16), ratio=0.01, compute_dtype=compute_dtype, compile=compile).cuda()
    generator = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(128, 32, device="cuda", generator=generator)
    target = torch.randint(0, 10, (128,), device="cuda", generator=generator)
    return model, adjuster, x, target


def make_step(model, adjuster, x, target, amp=False, detailed=True):
    def step(lr=0.1):
        model.zero_grad(set_to_none=True)
        adjuster.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        return adjuster.backward(out, lambda z: F.cross_entropy(z, target), lr, detailed=detailed,
                                 per_sample_loss_fn=lambda z: F.cross_entropy(z, target, reduction="none"))
    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amp", [False, True])
def test_step_makes_no_host_sync(mode, amp, compute_dtype):
    step = make_step(*problem(compute_dtype, MODES[mode]), amp=amp)
    for lr in (0.1, 0.2, 0.3):  # the first calls allocate, compile and record
        step(lr)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = step(0.4)  # an lr not seen before: a float lr must neither recompile nor copy from the host
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v == v for v in stats.to_dict().values())


@pytest.mark.parametrize("mode", ["compiled", "graphed"])
def test_compiled_modes_equal_eager_without_recompiling(mode):
    """GAL's arithmetic in float64, so that R's sign (which orients h's gradient) is not float32 rounding that
    Triton's and the eager kernels' summation orders could flip; the float32 cases are compared on CPU."""
    results = {}
    for name in ("eager", mode):
        model, adjuster, x, target = problem(torch.float64, compile=MODES[name])
        step = make_step(model, adjuster, x, target)
        step(0.05)
        step(0.07)  # warm-up: compile, then record the CUDA graph
        with torch.compiler.set_stance("fail_on_recompile" if name != "eager" else "default"):
            stats = [step(lr).to_dict() for lr in (0.1, 0.2, 5.0)]
        results[name] = stats, [p.grad.clone() for p in [*model.parameters(), *adjuster.parameters()]]
        if name == "graphed":
            assert adjuster.cudagraph_skips == []  # it really ran as CUDA graphs
    for eager_stats, compiled_stats in zip(results["eager"][0], results[mode][0]):
        assert compiled_stats == pytest.approx(eager_stats, rel=1e-9, abs=1e-9)
    for a, b in zip(results["eager"][1], results[mode][1]):  # the model and h compute in float32
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_graphed_statistics_outlive_the_next_replay():
    step = make_step(*problem(compile="reduce-overhead"), detailed=False)
    for lr in (0.1, 0.2):
        step(lr)
    first = step(0.3)
    expected = first.to_dict()
    step(0.9)  # replays the graph into the same memory
    assert first.to_dict() == expected
