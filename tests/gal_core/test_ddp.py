"""DDP on CPU (gloo, 2 processes): with a process group GAL is independent of how the batch is split.

Cases with an extra loss add a second head on the shared trunk whose loss is back-propagated in the same
backward call; DDP (no find_unused_parameters, no static graph) raises if a step calls backward twice."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gal_core import GradientAdjuster

WORLD, BATCH, DIM = 2, 12, 5
CASES = {  # name -> adjuster kwargs, lr, extra loss?; lr 0.05 accepts, lr 400 rejects (checked below)
    "safeguard_accept": (dict(ratio=0.3, scale=1.0), 0.05, False),
    "safeguard_reject": (dict(ratio=0.3, scale=1.0), 400.0, False),
    "always_exact": (dict(ratio=0.5, scale=2.0, policy="always", remainder="exact"), 0.1, False),
    "strict_mean": (dict(ratio=0.2, scale=1.0, policy="strict", remainder="mean"), 0.1, False),
    "safeguard_accept_extra": (dict(ratio=0.3, scale=1.0), 0.05, True),
    "safeguard_reject_extra": (dict(ratio=0.3, scale=1.0), 400.0, True),
    "never_extra": (dict(ratio=0.3, scale=1.0, policy="never"), 0.1, True),
    # the proposal variants; "batch" takes ||G||_F and ||H||_F over both ranks, its gradient included
    "batch_safeguard_accept": (dict(ratio=0.3, scale=1.0, proposal="batch"), 0.05, False),
    "batch_safeguard_reject": (dict(ratio=0.3, scale=1.0, proposal="batch"), 400.0, False),  # h's gradient O(1)
    "batch_always_exact_extra": (dict(ratio=0.5, scale=2.0, policy="always", remainder="exact", proposal="batch"),
                                 0.1, True),
    "bounded_safeguard_accept": (dict(ratio=0.3, scale=1.0, proposal="bounded"), 0.05, False),
    "bounded_strict_mean_extra": (dict(ratio=0.2, scale=1.0, policy="strict", remainder="mean",
                                       proposal="bounded"), 0.1, True),
}
CLASSES = 3


def data():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(BATCH, 7, generator=generator), torch.randn(BATCH, DIM, generator=generator),
            torch.randint(0, CLASSES, (BATCH,), generator=generator))


class Net(nn.Module):
    """A trunk with the adjusted head and, optionally, a second head for the extra loss."""

    def __init__(self, extra):
        super().__init__()
        self.trunk, self.head = nn.Sequential(nn.Linear(7, 16), nn.Tanh()), nn.Linear(16, DIM)
        self.aux = nn.Linear(16, CLASSES) if extra else None

    def forward(self, x):
        features = self.trunk(x)
        return self.head(features), None if self.aux is None else self.aux(features)


def build(kwargs, extra, process_group=None):
    torch.manual_seed(1)
    return Net(extra), GradientAdjuster(DIM, (8, 4), process_group=process_group, **kwargs)


def step(model, adjuster, x, target, labels, lr):
    output, aux = model(x)
    extra_loss = None if aux is None else F.cross_entropy(aux, labels)  # this shard's mean, as plain DDP
    stats = adjuster.backward(output, lambda z: F.mse_loss(z, target), lr, extra_loss=extra_loss,
                              per_sample_loss_fn=lambda z: F.mse_loss(z, target, reduction="none").mean(-1),
                              detailed=True)
    return {"model": [p.grad for p in model.parameters()], "h": [p.grad for p in adjuster.parameters()],
            "stats": stats.to_dict()}


def _worker(rank, init_file, out_dir, global_decisions):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    x, target, labels = data()
    shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for name, (kwargs, lr, extra) in CASES.items():
        model, adjuster = build(kwargs, extra, dist.group.WORLD if global_decisions else None)
        adjuster.wrap_ddp()
        result = step(DistributedDataParallel(model), adjuster, x[shard], target[shard], labels[shard], lr)
        torch.save(result, f"{out_dir}/{name}_{rank}.pt")
    dist.destroy_process_group()


def run_ranks(tmp_path, global_decisions):
    mp.start_processes(_worker, args=(tmp_path / "init", tmp_path, global_decisions), nprocs=WORLD,
                       start_method="spawn")
    return {name: [torch.load(tmp_path / f"{name}_{r}.pt") for r in range(WORLD)] for name in CASES}


def close(a, b):
    # float32 sums in another order (two shards and an all-reduce): an element small beside the tensor's
    # largest moves by a rounding step of that largest (seen on a 16-core CPU: 8e-7 next to values of 4.7)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))


@pytest.fixture(scope="module")
def two_process_global(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("ddp_global"), global_decisions=True)


@pytest.mark.parametrize("name", CASES)
def test_two_processes_match_one_process_on_the_global_batch(two_process_global, name):
    kwargs, lr, extra = CASES[name]
    single = step(*build(kwargs, extra), *data(), lr)
    for rank_result in two_process_global[name]:
        for key in ("model", "h"):
            for got, expected in zip(rank_result[key], single[key]):
                close(got, expected)
        for stat, value in single["stats"].items():
            # abs 1e-6: R is a difference of O(1) losses, so float32 rounding of the shard sums shows there;
            # in units of L's float32 spacing (remainder_ulps) that rounding is a step or two
            tolerance = 2.0 if stat == "remainder_ulps" else 1e-6
            assert rank_result["stats"][stat] == pytest.approx(value, rel=1e-5, abs=tolerance), stat


def test_cases_cover_both_safeguard_decisions(two_process_global):
    assert two_process_global["safeguard_accept"][0]["stats"]["accepted"] == 1.0
    assert two_process_global["safeguard_reject"][0]["stats"]["accepted"] == 0.0
    assert two_process_global["safeguard_accept_extra"][0]["stats"]["accepted"] == 1.0
    assert two_process_global["safeguard_reject_extra"][0]["stats"]["accepted"] == 0.0
    assert two_process_global["batch_safeguard_accept"][0]["stats"]["accepted"] == 1.0
    assert two_process_global["batch_safeguard_reject"][0]["stats"]["accepted"] == 0.0
    assert two_process_global["bounded_safeguard_accept"][0]["stats"]["accepted"] == 1.0


def test_without_process_group_ranks_decide_alone_but_share_h_gradients(tmp_path):
    results = run_ranks(tmp_path, global_decisions=False)
    for name in CASES:
        rank0, rank1 = results[name]
        for key in ("model", "h"):  # DDP averaged both, so every rank holds the same gradients
            for a, b in zip(rank0[key], rank1[key]):
                close(a, b)
        assert rank0["stats"]["loss"] != rank1["stats"]["loss"]  # statistics are each rank's own shard's
