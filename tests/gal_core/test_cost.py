"""What the eager step costs: aten ops dispatched (issue 23's goal, at most 60 that do work), statistics that
cost nothing until read or asked for, and the hand-written backward of the row normalisation."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.gal_ops import count_ops
from gal_core import GradientAdjuster
from gal_core.step import _AddNormalized


def leaf_problem(rows=128, classes=1000, arch=(512, 128)):
    """Issue 23's setting: a leaf output as logits, cross-entropy, lr 0.1."""
    torch.manual_seed(0)
    z = torch.randn(rows, classes, requires_grad=True)
    labels = torch.randint(0, classes, (rows,))
    return z, lambda out: F.cross_entropy(out, labels), GradientAdjuster(classes, arch, ratio=1e-3)


@pytest.fixture
def nondeterministic():
    """The measured setting: torch's default algorithms (deterministic ones add 13 ops to the step; a run's
    configure_torch in an earlier test of this process may have left them on)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(was)


def test_eager_step_dispatches_at_most_60_ops_that_do_work(nondeterministic):
    z, loss_fn, adjuster = leaf_problem()

    def reset():
        z.grad = None
        adjuster.zero_grad(set_to_none=True)

    ops = count_ops(lambda: adjuster.backward(z, loss_fn, 0.1), reset)
    assert ops["work_ops"] <= 60, ops["by_name"]
    assert ops["matmuls"] == 8  # h's three layers: 3 forward, 5 backward (no gradient into the detached z0)


def test_statistics_are_derived_when_read_and_detailed_ones_only_when_asked():
    z, loss_fn, adjuster = leaf_problem(rows=8, classes=10, arch=(16,))
    adjuster.backward(z, loss_fn, 0.1)  # h's gradients now exist: a detailed step must clone them

    def step(read=False, detailed=False):
        def call():
            stats = adjuster.backward(z, loss_fn, 0.1, detailed=detailed)
            if read:
                stats.to_dict()
        return call

    plain, read, detailed = count_ops(step()), count_ops(step(read=True)), count_ops(step(detailed=True))
    assert read["work_ops"] > plain["work_ops"] and detailed["work_ops"] > plain["work_ops"]
    assert "aten::nextafter" not in plain["by_name"] and "aten::nextafter" in read["by_name"]  # remainder_ulps
    assert not any("clone" in name for name in aten_calls(step(read=True)))
    assert any("clone" in name for name in aten_calls(step(detailed=True)))  # h's gradients before the call


def aten_calls(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("rows_of_zeros", [False, True])
def test_row_normalisation_backward_matches_finite_differences(rows_of_zeros):
    torch.manual_seed(0)
    g = torch.randn(4, 3, dtype=torch.float64)
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    if rows_of_zeros:
        with torch.no_grad():
            g[1] = 0  # zero gradient row: a_hat is 0 whatever a is
    g_norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    assert torch.autograd.gradcheck(lambda a: _AddNormalized.apply(g, a, g_norm, 0.7)[0], (a,))
