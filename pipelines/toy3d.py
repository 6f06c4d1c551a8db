"""The 3-D toy of Fig. 4: plain training vs GAL on a 2-D surface, for five optimisers.

    python -m pipelines.toy3d [key=value ...]      e.g. optimizers=[gd] runs.gd.steps=20 profile=smoke

Settings live in pipelines/conf/task/toy3d.yaml; key=value overrides (pipelines/config.py). A bad key or value
prints one line on stderr and exits with code 2 before anything is written. Each optimiser x method is one
tracked run, runs/toy3d/<optimizer>-<method>/ (history.csv: step, x, y, z and, for GAL, the accepted flag
and remainder of the step that led to the point); the report stage draws Fig. 4 from them.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import MISSING

from gal_core.optim import build_optimizer
from pipelines.config import CONF, load_file
from pipelines.errors import ConfigError, run_cli
from pipelines.surface import surface
from pipelines.training.method import build_adjuster
from pipelines.tracking.run import RunTracker

METHODS = ("baseline", "gal")


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


def adjuster(cfg: Toy3dConf, run: RunConf):
    """GAL on the point (width 2), through the pipelines' one adjuster factory."""
    method = {"gal": True, "arch": list(cfg.arch), "ratio": run.ratio, "scale": run.scale, "remainder": cfg.remainder}
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


def run_path(cfg: Toy3dConf, run: RunConf, gal: bool) -> list[dict]:
    """Minimise the surface from cfg.start; one dict per point visited: step, x, y, z, accepted, remainder."""
    point = torch.nn.Parameter(torch.tensor(cfg.start, dtype=torch.float32))
    params = [point]
    if gal:
        torch.manual_seed(run.seed)  # the run's h, whatever ran before it
        adj = adjuster(cfg, run)
        params += list(adj.parameters())  # h trains in the same optimiser, at the same lr
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
            stats = adj.backward(point, surface, opt.param_groups[0]["lr"]).to_dict()
            stats["accepted"] = int(stats["accepted"])
        else:
            surface(point).backward()
        opt.step()
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
    for name in cfg.optimizers:
        run = cfg.runs[name]
        try:  # build everything once so a bad value fails here, before any run
            if run.steps < 1 or not run.lr > 0:
                raise ValueError(f"steps must be >= 1 and lr > 0, got steps={run.steps}, lr={run.lr}")
            adj = adjuster(cfg, run)
            _optimizer(run, [torch.nn.Parameter(torch.zeros(2)), *adj.parameters()])
        except (ValueError, TypeError, ImportError, ConfigError) as err:
            raise ConfigError(f"setting up run {name!r}: {str(err).splitlines()[0]}") from None
    return cfg


def train_all(cfg: Toy3dConf) -> None:
    shared = {k: v for k, v in asdict(cfg).items() if k not in ("runs", "optimizers")}
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    return run_cli("toy3d", lambda: train_all(load_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
