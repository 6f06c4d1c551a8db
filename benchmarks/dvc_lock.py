"""What DVC spends on rewriting dvc.lock after one stage, its own round-trip writer against pipelines/dvc_cli.py's,
on a synthetic lock shaped like ours.

    python -m benchmarks.dvc_lock [--stages 100,400,700] [--deps 35] [--repeats 3]

For each size, a lock of that many stages (each: a command, ``--deps`` source files, a param, one output: about
150 lines, as our stages have) is written to a temporary directory; then, ``--repeats`` times each and
interleaved, one stage is added through ``modify_yaml`` as DVC's ``Lockfile.dump_stages`` calls it:
- dvc: DVC's own round-trip writer;
- ours_first: pipelines/dvc_cli.py's, the lock written by another process (parsed, every stage rendered): each
  stage of `make fanout`, which runs each in its own DVC process;
- ours_next: the same process's next write (nothing parsed, one stage rendered): `make repro`.
A repro that runs N stages from an empty lock rewrites it N times, at every size from 0 to N: about N/2 times
the cost at N, which ``repro_of_all_stages_s`` gives.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

from pipelines.machine import describe


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="100,400,700", help="lock sizes, in stages")
    parser.add_argument("--deps", type=int, default=35, help="source files per stage")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def stage(i: int, deps: int) -> OrderedDict:
    """One stage's lock entry, as dvc.stage.serialize.to_lockfile gives it (OrderedDicts)."""
    files = [OrderedDict(path=f"pipelines/module_{j}.py", hash="md5", md5=f"{i:08x}{j:024x}", size=1000 + j)
             for j in range(deps)]
    return OrderedDict(cmd=f"python -m pipelines.train experiment=boston_gal seed={i} profile=regression",
                       deps=files, params=OrderedDict({"params.yaml": OrderedDict(profile="regression")}),
                       outs=[OrderedDict(path=f"runs/regression/run-{i}", hash="md5", md5=f"{i:032x}.dir",
                                         size=5000, nfiles=4)])


def add_one(modify_yaml, path: Path, name: str, deps: int) -> float:
    start = time.perf_counter()
    with modify_yaml(str(path)) as data:
        data["stages"][name] = stage(10**6, deps)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    import dvc.dvcfile

    from pipelines import dvc_cli

    args = parse_args(argv)
    dvcs = dvc.dvcfile.modify_yaml
    dvc_cli.install()
    ours = dvc.dvcfile.modify_yaml
    dvc.dvcfile.modify_yaml = dvcs  # this process's DVC as it was
    rows = []
    with tempfile.TemporaryDirectory(prefix="gal-dvc-lock-") as tmp:
        for n in (int(s) for s in args.stages.split(",")):
            lock = Path(tmp) / "dvc.lock"
            text = dvc_cli.render({"schema": "2.0", "stages": {f"s{i}": stage(i, args.deps) for i in range(n)}})
            times = {"dvc": [], "ours_first": [], "ours_next": []}
            for r in range(args.repeats):
                lock.write_text(text)
                times["dvc"].append(add_one(dvcs, lock, f"new{r}", args.deps))
                lock.write_text(text)
                dvc_cli._written.clear(), dvc_cli._stages.clear()
                times["ours_first"].append(add_one(ours, lock, f"new{r}", args.deps))
                times["ours_next"].append(add_one(ours, lock, f"next{r}", args.deps))
            median = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"stages": n, "lines": text.count("\n"),
                         "median_s": {k: round(v, 3) for k, v in median.items()},
                         "all_s": {k: [round(s, 3) for s in v] for k, v in times.items()},
                         "dvc_over_ours": {k: round(median["dvc"] / median[k], 1) for k in ("ours_first", "ours_next")},
                         "repro_of_all_stages_s": {k: round(v * n / 2) for k, v in median.items()}})
    result = {"deps_per_stage": args.deps, "repeats": args.repeats, "sizes": rows, "machine": describe()}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
