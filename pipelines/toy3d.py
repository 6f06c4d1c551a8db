"""The 3-D toy of Fig. 4: plain training vs GAL on a 2-D surface, for five optimisers.

    python -m pipelines.toy3d [key=value ...]      e.g. optimizers=[gd] runs.gd.steps=20 profile=smoke
    python -m pipelines.toy3d study=beyond seeds=10 optimizers=[gd]           (ours: Beyond the paper)

Settings live in pipelines/conf/task/toy3d.yaml; key=value overrides (pipelines/config.py). A bad key or value
prints one line on stderr and exits with code 2 before anything is written. Each optimiser x method is one
tracked run, runs/toy3d/<optimizer>-<method>/ (history.csv: step, x, y, z and, for GAL, the accepted flag
and remainder of the step that led to the point); the report stage draws Fig. 4 from them.

``study=beyond`` (ours: the "Beyond the paper" study, stage beyond_toy3d) runs, for each optimiser and each of
``seeds`` seeds (h's seed offset by it), the baseline and GAL with each of ``proposals``, one tracked run each:
``runs/toy3d_beyond/<optimizer>-<method>[-prop-<proposal>]-beyond-s<seed>/``. Their final metrics add the mean z
over the path (lower: a faster descent; every arm ends in the same minimum), h's gradient norm (mean over steps),
h's movement over the run relative to its initial norm and the fraction of steps the safeguard accepted. The toy
is one point (one row), so "batch" equals "row" there.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import MISSING

from gal_core.optim import build_optimizer
from pipelines.config import CONF, load_file
from pipelines.errors import ConfigError, run_cli
from pipelines.surface import surface
from pipelines.training.method import adjuster_movement, adjuster_snapshot, build_adjuster
from pipelines.tracking.run import RunTracker

METHODS = ("baseline", "gal")
STUDY = "beyond"
BEYOND_KEYS = ("study", "seeds", "proposals")  # the beyond study's settings: not part of Fig. 4's runs' configs


@dataclass
class RunConf:
    """Types of one optimiser's settings; the values come from the YAML file."""

    label: str = MISSING
    seed: int = MISSING  # torch seed for h's initialisation
    optimizer: str = MISSING  # a gal_core.optim name
    lr: float = MISSING
    steps: int = MISSING
    ratio: float = MISSING  # GAL's eps
    scale: float = MISSING  # GAL's s
    kwargs: Dict[str, Any] = MISSING  # further optimiser arguments


@dataclass
class Toy3dConf:
    h_init: str = MISSING  # xavier_uniform | default
    start: List[float] = MISSING
    arch: List[int] = MISSING
    remainder: str = MISSING
    optimizers: List[str] = MISSING
    profile: str = MISSING
    runs_root: str = MISSING
    runs: Dict[str, RunConf] = MISSING
    study: Optional[str] = None  # beyond: the study's runs (see the module's docstring)
    seeds: int = 0
    proposals: List[str] = MISSING


def adjuster(cfg: Toy3dConf, run: RunConf, proposal: str = "row"):
    """GAL on the point (width 2), through the pipelines' one adjuster factory."""
    method = {"gal": True, "arch": list(cfg.arch), "ratio": run.ratio, "scale": run.scale, "remainder": cfg.remainder,
              "proposal": proposal}
    adj = build_adjuster(method, dim=2)
    if cfg.h_init == "xavier_uniform":  # as the authors' toy script initialises h
        for layer in adj.net.modules():
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    torch.nn.init.zeros_(layer.bias)
    return adj


def _optimizer(run: RunConf, params: list) -> torch.optim.Optimizer:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in run.kwargs.items()}
    return build_optimizer(run.optimizer, params, lr=run.lr, **kwargs)


def run_path(cfg: Toy3dConf, run: RunConf, gal: bool, proposal: str = "row", seed: int = 0,
             h: dict | None = None) -> list[dict]:
    """Minimise the surface from cfg.start; one dict per point visited: step, x, y, z, accepted, remainder.
    GAL's h is drawn from the run's seed plus ``seed``; ``h``, when given, receives h's gradient norm (mean over
    steps) and its movement over the run."""
    point = torch.nn.Parameter(torch.tensor(cfg.start, dtype=torch.float32))
    params = [point]
    if gal:
        torch.manual_seed(run.seed + seed)  # the run's h, whatever ran before it
        adj = adjuster(cfg, run, proposal)
        params += list(adj.parameters())  # h trains in the same optimiser, at the same lr
        start, grads = adjuster_snapshot(adj), []
    opt = _optimizer(run, params)
    rows, stats = [], {}
    for step in range(run.steps + 1):
        with torch.no_grad():
            x, y = point.tolist()
            z = surface(point).item()
        rows.append({"step": step, "x": x, "y": y, "z": z,
                     "accepted": stats.get("accepted", ""), "remainder": stats.get("remainder", "")})
        if step == run.steps:
            break
        opt.zero_grad(set_to_none=True)
        if gal:
            stats = adj.backward(point, surface, opt.param_groups[0]["lr"], detailed=h is not None).to_dict()
            stats["accepted"] = int(stats["accepted"])
            grads.append(stats.get("adjuster_grad_norm"))
        else:
            surface(point).backward()
        opt.step()
    if gal and h is not None:
        h.update(adjuster_grad_norm=sum(grads) / len(grads), **adjuster_movement(adj, start))
    return rows


def load_config(overrides: list[str]) -> Toy3dConf:
    """conf/task/toy3d.yaml with key=value overrides, type-checked; ConfigError on any bad key or value."""
    cfg: Toy3dConf = load_file(CONF / "task" / "toy3d.yaml", overrides, Toy3dConf)
    unknown = [name for name in cfg.optimizers if name not in cfg.runs]
    if unknown or not cfg.optimizers:
        raise ConfigError(f"optimizers must name runs among {sorted(cfg.runs)}, got {cfg.optimizers}")
    if len(cfg.start) != 2:
        raise ConfigError(f"start must be a point (x, y), got {cfg.start}")
    if cfg.h_init not in ("xavier_uniform", "default"):
        raise ConfigError(f"h_init={cfg.h_init!r}: use xavier_uniform or default")
    if cfg.study not in (None, STUDY) or (cfg.study == STUDY) != (cfg.seeds > 0):
        raise ConfigError(f"study={cfg.study!r}, seeds={cfg.seeds}: use study={STUDY} with seeds >= 1, or neither "
                          "(Fig. 4's runs)")
    for name in cfg.optimizers:
        run = cfg.runs[name]
        try:  # build everything once so a bad value fails here, before any run
            if run.steps < 1 or not run.lr > 0:
                raise ValueError(f"steps must be >= 1 and lr > 0, got steps={run.steps}, lr={run.lr}")
            for proposal in cfg.proposals:
                adj = adjuster(cfg, run, proposal)
            _optimizer(run, [torch.nn.Parameter(torch.zeros(2)), *adj.parameters()])
        except (ValueError, TypeError, ImportError, ConfigError) as err:
            raise ConfigError(f"setting up run {name!r}: {str(err).splitlines()[0]}") from None
    return cfg


def train_all(cfg: Toy3dConf) -> None:
    if cfg.study == STUDY:
        return train_beyond(cfg)
    shared = {k: v for k, v in asdict(cfg).items() if k not in ("runs", "optimizers", *BEYOND_KEYS)}
    for name in cfg.optimizers:
        run = cfg.runs[name]
        finals = {}
        for method in METHODS:
            config = {"task": "toy3d", "optimizer": name, "method": method, "seed": run.seed, "run": asdict(run),
                      **shared}  # the seed of h, where every run record keeps its seed
            with RunTracker("toy3d", f"{name}-{method}", config, profile=cfg.profile, step_name="step",
                            runs_root=Path(cfg.runs_root)) as tracker:
                rows = run_path(cfg, run, gal=method == "gal")
                for row in rows:
                    tracker.log_epoch(row.pop("step"), {k: v for k, v in row.items() if v != ""})
                finals[method] = rows[-1]["z"]
                tracker.log_final({"final_x": rows[-1]["x"], "final_y": rows[-1]["y"], "final_z": rows[-1]["z"]})
        print(f"{run.label:>14}: final z baseline {finals['baseline']:+.5f} vs GAL {finals['gal']:+.5f} "
              f"({run.steps} steps)")


def train_beyond(cfg: Toy3dConf) -> None:
    """The beyond study's runs: per optimiser and seed, the baseline and GAL with each proposal."""
    shared = {k: v for k, v in asdict(cfg).items() if k not in ("runs", "optimizers", *BEYOND_KEYS)}
    arms = [("baseline", None), *(("gal", p) for p in cfg.proposals)]
    for name in cfg.optimizers:
        run = cfg.runs[name]
        for seed in range(cfg.seeds):
            for method, proposal in arms:
                token = "-".join([*([f"prop-{proposal}"] if proposal not in (None, "row") else []), STUDY])
                config = {"task": "toy3d_beyond", "optimizer": name, "study": STUDY, "seed": seed,
                          "method": {"name": method, **({"proposal": proposal} if proposal else {})},
                          "run": asdict(run), **shared}
                with RunTracker("toy3d_beyond", f"{name}-{method}-{token}-s{seed}", config, profile=cfg.profile,
                                step_name="step", runs_root=Path(cfg.runs_root), variant=token) as tracker:
                    h: dict = {}
                    rows = run_path(cfg, run, gal=method == "gal", proposal=proposal or "row", seed=seed, h=h)
                    path_z = sum(row["z"] for row in rows) / len(rows)
                    accepted = [row["accepted"] for row in rows[1:]] if method == "gal" else []
                    for row in rows:
                        tracker.log_epoch(row.pop("step"), {k: v for k, v in row.items() if v != ""})
                    tracker.log_final({"final_z": rows[-1]["z"], "path_mean_z": path_z, **h,
                                       **({"accepted": sum(accepted) / len(accepted)} if accepted else {})})
        print(f"{run.label:>14}: {cfg.seeds} seeds x {len(arms)} arms")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    return run_cli("toy3d", lambda: train_all(load_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
