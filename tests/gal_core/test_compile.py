"""The compiled step (GradientAdjuster(compile=...)): one graph, no recompilation, the eager step's numbers.

Every case runs the same few steps (lr, data and loss closure new each step) eagerly and compiled, on CPU
with Inductor; float64 must agree to 1e-12, float32 to 1e-6. Shapes are small, so compiling dominates.
"""
import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from gal_core import GradientAdjuster, float32_spacing

DIM = 5
LRS = (0.05, 400.0, 0.4)  # a small and a too-large trial step: the safeguard both accepts and rejects
CASES = {  # name -> adjuster kwargs, step options
    "safeguard_reference_learned": (dict(), dict()),
    "strict_exact_learned": (dict(policy="strict", remainder="exact"), dict()),
    "always_mean_uniform": (dict(policy="always", remainder="mean", source="uniform"), dict()),
    "never_reference_normal": (dict(policy="never", source="normal"), dict()),
    "safeguard_unnormalised_uniform": (dict(source="uniform", normalize=False), dict()),
    "safeguard_extra_loss": (dict(), dict(extra=True)),
    "always_extra_loss": (dict(policy="always"), dict(extra=True)),
    "safeguard_grad_scaler": (dict(), dict(scaler=True)),
    "safeguard_float32": (dict(), dict(dtype=torch.float32)),
    "always_cnn_float32_detailed": (dict(policy="always", kind="cnn", arch=(3,)), dict(dtype=torch.float32,
                                                                                         detailed=True)),
    "safeguard_batch_proposal": (dict(proposal="batch"), dict()),
    "safeguard_bounded_proposal": (dict(proposal="bounded"), dict()),
}


class TwoHeads(nn.Module):
    """A trunk with the adjusted head and a second head for the extra loss."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.head, self.aux = nn.Linear(12, DIM), nn.Linear(12, 3)

    def forward(self, x):
        features = self.trunk(x)
        return self.head(features), self.aux(features)


def build(kwargs, dtype, compile, model=None):
    torch.manual_seed(0)
    fresh = TwoHeads().to(dtype)  # drawn in any case, so h's initial weights do not depend on ``model``
    model = fresh if model is None else model
    options = {"arch": (8, 4), "ratio": 0.3, **kwargs}
    if options.get("source", "learned") != "learned":
        options.pop("arch")
    adjuster = GradientAdjuster(DIM, **options, compile=compile).to(dtype)
    return model, adjuster


def batch(step, dtype):
    """Inputs, the adjusted head's target and the extra head's target of one step."""
    generator = torch.Generator().manual_seed(step)
    return tuple(torch.randn(16, width, generator=generator, dtype=dtype) for width in (6, DIM, 3))


def run(model, adjuster, dtype=torch.float64, extra=False, scaler=False, detailed=False, lrs=LRS):
    """Steps with a new lr and loss closure each; per step the statistics and all gradients."""
    results = []
    for step, lr in enumerate(lrs):
        x, target, aux_target = batch(step, dtype)
        model.zero_grad(set_to_none=True)
        adjuster.zero_grad(set_to_none=True)
        output, aux = model(x)
        torch.manual_seed(100 + step)  # the noise sources draw the same noise in both modes
        stats = adjuster.backward(
            output, lambda z: F.mse_loss(z, target), lr, extra_loss=F.mse_loss(aux, aux_target) if extra else None,
            scaler=torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None, detailed=detailed,
            per_sample_loss_fn=lambda z: (z - target).pow(2).mean(-1))
        # a parameter without a gradient as zeros: a compiled model gives its unused head zeros, not None
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in [*model.parameters(),
                                                                              *adjuster.parameters()]]
        results.append((stats.to_dict(), grads))
    return results


def _absolute(name, tolerance, stats):
    """The absolute tolerance of a statistic; remainder_ulps counts R in float32 spacings of L, so R's
    tolerance is expressed in those units (float32 rounds the trial loss's sum in another order when compiled,
    which moves R by a few spacings)."""
    if name != "remainder_ulps":
        return tolerance
    return tolerance / float32_spacing(torch.tensor(stats["loss"])).item()


def assert_equal_steps(eager, compiled, dtype):
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for (eager_stats, eager_grads), (compiled_stats, compiled_grads) in zip(eager, compiled, strict=True):
        assert eager_stats.keys() == compiled_stats.keys()
        for name, value in eager_stats.items():
            assert compiled_stats[name] == pytest.approx(value, rel=tolerance, abs=_absolute(name, tolerance,
                                                                                             eager_stats)), name
        assert len(eager_grads) == len(compiled_grads)
        for a, b in zip(eager_grads, compiled_grads):
            torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", CASES)
def test_compiled_step_equals_eager(name):
    kwargs, options = CASES[name]
    dtype = options.get("dtype", torch.float64)
    step_options = {k: v for k, v in options.items() if k != "dtype"}
    eager = run(*build(kwargs, dtype, compile=False), dtype=dtype, **step_options)
    graphs = counters["stats"]["unique_graphs"]
    compiled = run(*build(kwargs, dtype, compile=True), dtype=dtype, **step_options)
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph, compiled once, run by every step
    assert_equal_steps(eager, compiled, dtype)
    accepted = [stats["accepted"] for stats, _ in eager]
    if kwargs.get("policy", "safeguard") in ("safeguard", "strict") and kwargs.get("normalize", True):
        assert 0.0 in accepted and 1.0 in accepted  # both branches of the safeguard were compared


def test_one_graph_and_no_recompilation_over_20_steps_with_a_changing_lr():
    counters.clear()
    model, adjuster = build({}, torch.float64, compile=True)
    lrs = [0.01 * (1 + step) for step in range(20)]
    run(model, adjuster, lrs=lrs[:2])  # warm-up: compiles the forward and the backward graph
    with torch.compiler.set_stance("fail_on_recompile"):
        run(model, adjuster, lrs=lrs[2:])
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1  # the compiled part is one graph (fullgraph=True)


def test_autocast_region_does_not_recompile_or_change_the_numbers():
    results = {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(6, DIM)
        adjuster = GradientAdjuster(DIM, (8,), ratio=0.3, compile=compile)
        x, target, _ = batch(0, torch.float32)
        loss_fn = lambda z: F.mse_loss(z.float(), target)  # noqa: E731
        adjuster.backward(model(x), loss_fn, 0.1)  # warm-up outside autocast
        with torch.compiler.set_stance("fail_on_recompile" if compile else "default"):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = model(x)
                assert output.dtype == torch.bfloat16
                stats = adjuster.backward(output, loss_fn, 0.2)
        results[compile] = (stats.to_dict(), [p.grad.clone() for p in model.parameters()])
    assert_equal_steps([results[False]], [results[True]], torch.float32)


def test_gal_works_on_a_model_compiled_by_the_user():
    eager = run(*build({}, torch.float64, compile=False))
    torch.manual_seed(0)
    compiled_model = torch.compile(TwoHeads().double())
    for compile in (False, True):  # GAL eager and compiled, on the compiled model
        compiled_model._orig_mod.load_state_dict(build({}, torch.float64, compile=False)[0].state_dict())
        assert_equal_steps(eager, run(*build({}, torch.float64, compile=compile, model=compiled_model)),
                           torch.float64)


def test_cuda_graph_fallback_is_reported_not_silent():
    """On CPU, mode="reduce-overhead" cannot record CUDA graphs: torch falls back quietly; GAL says so."""
    model, adjuster = build({}, torch.float64, compile="reduce-overhead")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = run(model, adjuster)
    assert adjuster.cudagraph_skips and "cpu" in adjuster.cudagraph_skips[0]
    assert any("without CUDA graphs" in str(w.message) for w in caught)
    assert_equal_steps(run(*build({}, torch.float64, compile=False)), graphed, torch.float64)


def test_compile_option_is_not_state():
    _, adjuster = build({}, torch.float64, compile=True)
    run(TwoHeads().double(), adjuster, lrs=LRS[:1])
    plain = GradientAdjuster(DIM, (8, 4), ratio=0.3).double()
    assert adjuster.state_dict().keys() == plain.state_dict().keys()
    import copy

    twin = copy.deepcopy(adjuster)  # the compiled function is not copied; the copy compiles its own
    assert twin.compiled and all(torch.equal(a, b) for a, b in zip(twin.parameters(), adjuster.parameters()))
    assert math.isfinite(run(TwoHeads().double(), twin, lrs=LRS[:1])[0][0]["loss"])


# --- a process group: 2 gloo processes, each comparing its compiled step with its eager step ---
WORLD = 2


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for proposal in ("row", "batch"):  # "batch" all-reduces its norms, differentiably, inside the graph
        for compile in (False, True):
            model, adjuster = build({"process_group": dist.group.WORLD, "proposal": proposal}, torch.float64,
                                    compile=compile)
            adjuster.wrap_ddp()
            results[proposal, compile] = run(nn.parallel.DistributedDataParallel(model), adjuster, extra=True,
                                             detailed=True)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_step_equals_eager_with_a_process_group(tmp_path):
    mp.start_processes(_worker, args=(tmp_path / "init", tmp_path), nprocs=WORLD, start_method="spawn")
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for proposal in ("row", "batch"):
            assert_equal_steps(results[proposal, False], results[proposal, True], torch.float64)
            assert results[proposal, True][0][0]["adjusted_better"] >= 0  # the detailed statistics are all-reduced
