"""The 3-D toy of Fig. 4: plain training vs GAL on a 2-D surface, for five optimisers.

    python -m pipelines.toy3d [key=value ...]      e.g. optimizers=[gd] runs.gd.steps=20 out_dir=reports/toy3d_gd

Settings live in pipelines/conf/task/toy3d.yaml; overrides are OmegaConf dotlist items. A bad key or value
prints one line on stderr and exits with code 2 before anything is written. Outputs in ``out_dir``:
toy3d_paths.csv (one row per point visited, the start included as step 0; ``accepted`` and ``remainder``
are the GAL statistics of the step that led to the row's point, empty for the start and the baseline),
toy3d.png and toy3d.pdf.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import MISSING, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from gal_core import GradientAdjuster  # noqa: E402
from gal_core.optim import build_optimizer  # noqa: E402

CONFIG = Path(__file__).parent / "conf" / "task" / "toy3d.yaml"
COLUMNS = ("optimizer", "method", "step", "x", "y", "z", "accepted", "remainder")
METHODS = ("baseline", "GAL")


@dataclass
class RunConf:
    """Types of one optimiser's settings; the values come from the YAML file."""

    label: str = MISSING
    optimizer: str = MISSING  # a gal_core.optim name
    lr: float = MISSING
    steps: int = MISSING
    ratio: float = MISSING  # GAL's eps
    scale: float = MISSING  # GAL's s
    kwargs: Dict[str, Any] = MISSING  # further optimiser arguments


@dataclass
class Toy3dConf:
    seed: int = MISSING
    start: List[float] = MISSING
    arch: List[int] = MISSING
    remainder: str = MISSING
    optimizers: List[str] = MISSING
    out_dir: str = MISSING
    runs: Dict[str, RunConf] = MISSING


class ConfigError(ValueError):
    """A bad setting; main reports it in one line and exits with code 2."""


def surface(p: torch.Tensor) -> torch.Tensor:
    """z(x, y) = -sin(x^2) cos(3 y^2) exp(-(x y)^2) - exp(-(x + y)^2); works on numpy arrays too."""
    x, y = p[..., 0], p[..., 1]
    lib = torch if isinstance(p, torch.Tensor) else np
    return -lib.sin(x**2) * lib.cos(3 * y**2) * lib.exp(-((x * y) ** 2)) - lib.exp(-((x + y) ** 2))


def _optimizer(run: RunConf, params: list) -> torch.optim.Optimizer:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in run.kwargs.items()}
    return build_optimizer(run.optimizer, params, lr=run.lr, **kwargs)


def run_path(cfg: Toy3dConf, run: RunConf, gal: bool) -> list[dict]:
    """Minimise the surface from cfg.start; one dict per point visited (COLUMNS without optimizer/method)."""
    point = torch.nn.Parameter(torch.tensor(cfg.start, dtype=torch.float32))
    params = [point]
    if gal:
        torch.manual_seed(cfg.seed)  # every GAL run starts from the same h
        adj = GradientAdjuster(dim=2, arch=tuple(cfg.arch), ratio=run.ratio, scale=run.scale,
                               remainder=cfg.remainder)
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


def plot(cfg: Toy3dConf, paths: dict[str, dict[str, list[dict]]], files: list[Path]) -> None:
    """One column per optimiser. Top: contours with both paths; bottom: z per step. Saved to each of
    ``files``, in the format of each name's suffix."""
    xs = [r["x"] for runs in paths.values() for rows in runs.values() for r in rows]
    ys = [r["y"] for runs in paths.values() for rows in runs.values() for r in rows]
    finite = lambda v: [a for a in v if math.isfinite(a)] or [0.0]  # noqa: E731
    lo = min(*finite(xs), *finite(ys), -1.5) - 0.25
    hi = max(*finite(xs), *finite(ys), 1.5) + 0.25
    grid = np.linspace(lo, hi, 241)
    gx, gy = np.meshgrid(grid, grid)
    gz = surface(np.stack([gx, gy], axis=-1))
    colors = {"baseline": "tab:red", "GAL": "tab:blue"}

    n = len(paths)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 0.8, 7.2), squeeze=False,
                             gridspec_kw={"height_ratios": [1.25, 1]}, layout="constrained")
    for col, (name, runs) in enumerate(paths.items()):
        run = cfg.runs[name]
        top, bottom = axes[0, col], axes[1, col]
        filled = top.contourf(gx, gy, gz, levels=30, cmap="viridis", rasterized=True)  # keeps the PDF small
        top.contour(gx, gy, gz, levels=15, colors="k", linewidths=0.3, alpha=0.5, rasterized=True)
        for method, rows in runs.items():
            top.plot([r["x"] for r in rows], [r["y"] for r in rows], "-", color=colors[method], lw=1.6,
                     label=f"{method} (final z {rows[-1]['z']:.3f})")
            bottom.plot([r["step"] for r in rows], [r["z"] for r in rows], color=colors[method], label=method)
        top.plot(*cfg.start, marker="*", color="white", mec="k", ms=13, ls="", label="start")
        top.set(title=f"{run.label}\nlr {run.lr:g}, {run.steps} steps, eps {run.ratio:g}, s {run.scale:g}",
                xlabel="x", ylabel="y", aspect="equal", xlim=(lo, hi), ylim=(lo, hi))
        top.legend(loc="lower left", fontsize=7, framealpha=0.85)
        bottom.set(title=f"{run.label}: z per step", xlabel="step", ylabel="z(x, y)")
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=8)
    fig.colorbar(filled, ax=axes[0, :].tolist(), label="z(x, y)", shrink=0.8)
    fig.suptitle("3-D toy (Fig. 4): z = -sin(x²) cos(3y²) exp(-(xy)²) - exp(-(x+y)²); baseline vs GAL")
    for file in files:  # no creation date in the PDF, so the same run gives the same bytes
        fig.savefig(file, dpi=150, metadata={"CreationDate": None} if file.suffix == ".pdf" else None)
    plt.close(fig)


def load_config(overrides: list[str]) -> Toy3dConf:
    """The YAML file merged with dotlist overrides, type-checked; ConfigError on any bad key or value."""
    try:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"expected key=value overrides, got {bad[0]!r}")
        cfg = OmegaConf.merge(OmegaConf.structured(Toy3dConf), OmegaConf.load(CONFIG),
                              OmegaConf.from_dotlist(overrides))
        cfg: Toy3dConf = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(str(err).splitlines()[0] + (f" (key {key})" if key else "")) from None
    unknown = [name for name in cfg.optimizers if name not in cfg.runs]
    if unknown or not cfg.optimizers:
        raise ConfigError(f"optimizers must name runs among {sorted(cfg.runs)}, got {cfg.optimizers}")
    if len(cfg.start) != 2:
        raise ConfigError(f"start must be a point (x, y), got {cfg.start}")
    for name in cfg.optimizers:
        run = cfg.runs[name]
        try:  # build everything once so a bad value fails here, before any run
            if run.steps < 1 or not run.lr > 0:
                raise ValueError(f"steps must be >= 1 and lr > 0, got steps={run.steps}, lr={run.lr}")
            adj = GradientAdjuster(dim=2, arch=tuple(cfg.arch), ratio=run.ratio, scale=run.scale,
                                   remainder=cfg.remainder)
            _optimizer(run, [torch.nn.Parameter(torch.zeros(2)), *adj.parameters()])
        except (ValueError, TypeError, ImportError) as err:
            raise ConfigError(f"setting up run {name!r}: {str(err).splitlines()[0]}") from None
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        print(f"toy3d: bad config: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    paths = {name: {method: run_path(cfg, cfg.runs[name], gal=method == "GAL") for method in METHODS}
             for name in cfg.optimizers}
    for name, runs in paths.items():
        base, gal = runs["baseline"][-1]["z"], runs["GAL"][-1]["z"]
        print(f"{cfg.runs[name].label:>14}: final z baseline {base:+.5f} vs GAL {gal:+.5f} "
              f"({cfg.runs[name].steps} steps)")

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finals = [out / "toy3d_paths.csv", out / "toy3d.png", out / "toy3d.pdf"]
    temps = [final.with_name(f".{final.stem}.{os.getpid()}.tmp{final.suffix}") for final in finals]
    try:  # write everything to temp names first, so a failure leaves no half-written output
        with open(temps[0], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            for name, runs in paths.items():
                for method, rows in runs.items():
                    writer.writerows({"optimizer": name, "method": method, **r} for r in rows)
        plot(cfg, paths, temps[1:])
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    print(f"wrote {', '.join(map(str, finals))}; {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
