"""What one GAL step costs by itself: aten ops that do work, Inductor kernels, and milliseconds.

The setting of issue 23: a 128 x 1000 leaf output (as logits), adjuster 512-128, cross-entropy, lr 0.1,
statistics as a training step leaves them (the detailed ones off). Prints one JSON object with
- the aten ops that do work per eager GAL step and per plain ``loss.backward()`` (torch.profiler: leaf aten
  ops, i.e. with no aten op below them, less views, allocations and metadata; h's matmuls are not leaves
  there and are counted apart as ``matmuls``), and the same after reading every default statistic;
- the kernels Inductor generates for the compiled step (forward and backward graphs; h's matmuls stay eager);
- GAL's own cost in ms (adjuster.backward minus plain backward on the same leaf) for each mode.

CPU:  python -m benchmarks.gal_ops
GPU:  python -m benchmarks.gal_ops --device cuda --modes eager,compiled,graphed
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import re
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from gal_core import GradientAdjuster

MODES = {"eager": False, "compiled": True, "graphed": "reduce-overhead"}  # mode -> GradientAdjuster(compile=)
# leaf aten ops that move no data: views, allocation, metadata, no-op conversions
NO_WORK = frozenset(f"aten::{name}" for name in (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "expand", "expand_as", "t", "transpose",
    "permute", "unsqueeze", "squeeze", "select", "slice", "unbind", "alias", "detach", "detach_", "lift_fresh",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "resolve_conj",
    "resolve_neg", "to", "promote_types", "result_type", "flatten", "unflatten", "split", "chunk", "narrow",
    "_has_compatible_shallow_copy_type", "requires_grad_", "is_nonzero", "set_"))
MATMULS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})
STATISTICS = ("loss", "tentative_loss", "remainder", "accepted", "cosine", "signed_remainder", "tie",
              "remainder_ulps")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="eager,compiled", help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--arch", default="512,128", help="adjuster hidden widths")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--accumulate", action="store_true",
                        help="keep gradients between calls, so they accumulate (issue 23's first count did)")
    return parser.parse_args(argv)


def count_ops(fn, reset=None) -> dict:
    """Aten ops one call of ``fn`` dispatches (after two warm-up calls); ``reset`` runs before each call,
    unprofiled (e.g. zeroing gradients as a training step does)."""
    for _ in range(2):
        (reset or (lambda: None))()
        fn()
    (reset or (lambda: None))()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    leaves = [e.name for e in events if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    work = collections.Counter(name for name in leaves if name not in NO_WORK)
    return {"work_ops": sum(work.values()), "matmuls": sum(e.name in MATMULS for e in events),
            "leaf_ops": len(leaves), "aten_calls": len(events), "by_name": dict(work.most_common())}


def inductor_kernels(step) -> dict:
    """The kernels Inductor generates when ``step`` (a compiled step's first call, forward and backward)
    compiles, caches off so that they are generated here: ``functions``, the kernel functions in the output
    code (each one launch: a Triton kernel on GPU, a C++ function on CPU), and ``loop_nests``, Inductor's own
    count (on CPU a function fuses several loop nests, which that metric counts one by one)."""
    import logging

    import torch._inductor.config
    import torch._inductor.metrics as metrics
    from torch._inductor.codecache import output_code_log

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.code: list[str] = []

        def emit(self, record):
            if record.getMessage().startswith("Output code: "):
                self.code.append(record.getMessage())

    handler, level, propagate = Collect(), output_code_log.level, output_code_log.propagate
    output_code_log.addHandler(handler)
    output_code_log.setLevel(logging.DEBUG)
    output_code_log.propagate = False  # collected here, not printed
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            metrics.reset()
            step()
    finally:
        output_code_log.removeHandler(handler)
        output_code_log.setLevel(level)
        output_code_log.propagate = propagate
    functions = [len(re.findall(r"= async_compile\.(?:triton|cpp_pybinding|cpp)\(", code)) for code in handler.code]
    return {"functions": sum(functions), "per_graph": functions, "loop_nests": metrics.generated_kernel_count}


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}; choose from {list(MODES)}")
    torch.manual_seed(0)
    arch = tuple(int(w) for w in args.arch.split(","))
    z = torch.randn(args.rows, args.classes, device=device, requires_grad=True)
    labels = torch.randint(0, args.classes, (args.rows,), device=device)
    loss_fn = lambda out: F.cross_entropy(out, labels)  # noqa: E731
    adjusters = {mode: GradientAdjuster(args.classes, arch, ratio=1e-3,
                                        **({"compile": MODES[mode]} if MODES[mode] else {})).to(device)
                 for mode in modes}
    for adjuster in adjusters.values():
        adjuster.load_state_dict(next(iter(adjusters.values())).state_dict())

    def zero_grad():  # as a training step does: the next backward writes .grad afresh
        if args.accumulate:
            return
        z.grad = None
        for adjuster in adjusters.values():
            adjuster.zero_grad(set_to_none=True)

    def plain():
        zero_grad()
        loss_fn(z).backward()

    def gal(mode, read_stats=False):
        def step():
            zero_grad()
            stats = adjusters[mode].backward(z, loss_fn, args.lr)
            if read_stats:
                [getattr(stats, name) for name in STATISTICS]
        return step

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": args.rows,
              "classes": args.classes, "arch": args.arch, "lr": args.lr, "accumulate": args.accumulate}
    if "compiled" in modes:  # first: the compiled step's first call compiles it, and the count is of that
        start = time.perf_counter()
        result["inductor_kernels_compiled_step"] = inductor_kernels(gal("compiled"))
        result["compile_s"] = time.perf_counter() - start
    if device.type == "cpu":  # op counts are a property of the dispatch, the same on any device
        result["ops_plain_backward"] = count_ops(lambda: loss_fn(z).backward(), zero_grad)
        if "eager" in modes:
            result["ops_eager_step"] = count_ops(gal("eager"), zero_grad)
            result["ops_eager_step_reading_statistics"] = count_ops(gal("eager", read_stats=True), zero_grad)
        if "compiled" in modes:
            result["ops_compiled_step_outside_inductor"] = count_ops(gal("compiled"), zero_grad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode in modes:  # warm-up (and compilation) outside the timings
            for _ in range(5):
                gal(mode)()
    result["cudagraph_skips"] = adjusters["graphed"].cudagraph_skips if "graphed" in modes else None
    result["warnings"] = sorted({str(w.message) for w in caught})
    rounds = {"plain": [], **{mode: [] for mode in modes}}
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits every mode alike
        rounds["plain"].append(timed_ms(plain, device, args.repeats))
        for mode in modes:
            rounds[mode].append(timed_ms(gal(mode), device, args.repeats))
    result["plain_backward_ms"] = statistics.median(rounds["plain"])
    for mode in modes:
        result[f"gal_{mode}_ms"] = statistics.median(rounds[mode])
        result[f"gal_{mode}_own_ms"] = statistics.median(g - p for g, p in zip(rounds[mode], rounds["plain"]))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
