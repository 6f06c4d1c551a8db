"""Table VIII: the adjuster's type (MLP or CNN) and hidden widths, EfficientNet-B1 on CIFAR-100 with SGD: the
adjuster's parameter count and the final top-1 test error over seeds, ours beside the paper's. The MLP
256-64-32 row is the SGD preset's own run (cifar100_sgd_gal, train_cifar); the other rows are its variants
(method.kind, method.arch; stage ablate_adjuster) and are left out while they have no runs. Claims: MLP beats
CNN at the widths where the paper's numbers show it, and MLP 256-64-32 is the best MLP."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.report import over_seeds
from pipelines.report import stats
from pipelines.report.model import Claim, Context, Layout, Number, Rendered
from pipelines.report.paper import lookup
from pipelines.report.render import fmt, markdown
from pipelines.report.selection import select

ARCHS = ((256,), (256, 64), (256, 64, 32), (256, 64, 32, 16))
PRESET = ("mlp", (256, 64, 32))       # cifar100_sgd_gal's adjuster (the paper's best)
STAGE = "ablate_adjuster"             # the dvc stage of every other row's runs


def widths(arch: tuple[int, ...]) -> str:
    return "-".join(map(str, arch))


def thousands(count: float) -> str:
    """The paper's "51.2K": 1e3 units, truncated to one decimal with integer arithmetic (48,384 -> 48.3K)."""
    return f"{int(round(count)) // 100 / 10:.1f}K"


def spellings(kind: str, arch: tuple[int, ...]) -> list[str]:
    """The run.json variants of a row: run identity's current spelling (lists as Hydra writes them, cnn-256,64)
    first, then the earlier one (cnn-256-64)."""
    return [f"{kind}-{sep.join(map(str, arch))}" for sep in (",", "-")]


def setting(kind: str, arch: tuple[int, ...], present: frozenset[str] = frozenset()) -> over_seeds.Setting:
    """A row's setting; its variant as spelled by the runs ``present`` (run.json variants), if any."""
    preset = (kind, arch) == PRESET
    names = spellings(kind, arch)
    return over_seeds.Setting(f"{kind.upper()} {widths(arch)}",
                       {"experiment": "cifar100_sgd", "method.kind": kind, "method.arch": list(arch)},
                       kind.upper(), stage="train_cifar" if preset else STAGE,
                       variant="" if preset else next((v for v in names if v in present), names[0]))


def settings(ctx: Context) -> tuple[over_seeds.Setting, ...]:
    """Every row's setting, in row order (MLP then CNN, widths growing)."""
    present = frozenset(r.variant for r in ctx.runs(over_seeds.TASK))
    return tuple(setting(kind, arch, present) for kind in ("mlp", "cnn") for arch in ARCHS)


@dataclass(frozen=True)
class AdjusterTable:
    name: str = "Table VIII"
    slug: str = "table8"
    kind: str = "table"
    key: str = "error"                    # key segment and paper.yaml name, as Tables I and II's
    params: str = "params_adjuster"       # metrics.json: the adjuster's weights (no biases, as the paper counts)

    def render(self, ctx: Context) -> Rendered:
        preset, rows_settings = setting(*PRESET), settings(ctx)
        cells, profile = select(self.name, ctx, over_seeds.TASK, rows_settings, ("gal",),
                                optional=[s.label for s in rows_settings if s.label != preset.label])
        numbers: list[Number] = []
        rows: list[list[str]] = []
        outcomes: dict[tuple[str, str], over_seeds.Outcome] = {}
        for s in rows_settings:
            if (s.label, "gal") not in cells:
                continue
            kind, arch = s.detail, s.label.split()[1]
            runs = cells[(s.label, "gal")]
            paper = lookup(f"{self.name}/{kind}/{arch}") or {}
            paper_error = (paper.get(self.key) or {}).get("mean")
            fields = {"adjuster": kind, "widths": arch}
            out = over_seeds.outcome([self.name, kind, arch], runs, key=self.key, fields=fields, paper=paper_error,
                                     best=over_seeds.BEST_ERROR)  # the authors' convention, as the paper's numbers
            final = over_seeds.outcome([self.name, kind, arch], runs, key=f"final_{self.key}", fields=fields)
            outcomes[(kind, arch)] = out
            params = "-"
            if out.finished:  # a diverged run has no final metrics, its parameter count included
                value = stats.compute("mean", [[r.metric(self.params) for r in out.finished]])
                num = Number(key=f"{self.name}/{kind}/{arch}/{self.params}/mean", value=value, text=thousands(value),
                             op="mean", metric=self.params, groups=[out.finished], paper=paper.get("params"),
                             aggregation=stats.describe("mean", self.params, [out.finished], unit="seeds")
                             + " (the same in every seed), in thousands, truncated as the paper prints them",
                             fields={"adjuster": kind, "widths": arch, "metric": self.params, "stat": "mean"})
                numbers.append(num)
                params = num.text
            numbers += out.numbers + list(final.stats.values())  # its diverged epochs are out's
            rows.append([kind, arch, str(len(runs)), params, paper.get("params", "-"), out.text, fmt(paper_error, 2),
                         final.text])

        claims: list[Claim] = []
        mlp_wins = []
        for arch in map(widths, ARCHS):
            paper_mlp, paper_cnn = (lookup(f"{self.name}/{k}/{arch}/{self.key}/mean") for k in ("MLP", "CNN"))
            if paper_mlp is not None and paper_cnn is not None and paper_mlp < paper_cnn:
                mlp_wins.append(arch)  # the paper claims it only where its own numbers show it
                if ("MLP", arch) in outcomes and ("CNN", arch) in outcomes:
                    claim, nums = over_seeds.versus(
                        self.name, f"MLP vs CNN {arch}", f"an MLP adjuster beats a CNN one at widths {arch}",
                        ("CNN", outcomes[("CNN", arch)]), ("MLP", outcomes[("MLP", arch)]),
                        [self.name, "t-test", f"MLP vs CNN {arch}", self.key], paper=(paper_cnn, paper_mlp))
                    claims.append(claim)
                    numbers += nums
        best = widths(PRESET[1])
        others = [(arch, out) for (kind, arch), out in outcomes.items() if kind == "MLP" and arch != best]
        if others:  # the best MLP beats every other: it beats the strongest of them
            arch, rival = min(others, key=lambda item: (item[1].diverged_fraction, item[1].mean))
            claim, nums = over_seeds.versus(
                self.name, f"MLP {best}",
                f"MLP {best} is the best MLP adjuster (vs the best other one present, {arch})",
                (f"MLP {arch}", rival), (f"MLP {best}", outcomes[("MLP", best)]),
                [self.name, "t-test", f"MLP {best} vs {arch}", self.key],
                paper=tuple(lookup(f"{self.name}/MLP/{a}/{self.key}/mean") for a in (arch, best)))
            claims.append(claim)
            numbers += nums

        preset_runs = {r.get(over_seeds.SEED_KEY): r for r in cells[(preset.label, "gal")]}
        baselines = {r.dir: preset_runs[r.get(over_seeds.SEED_KEY)].dir for s in rows_settings if s.label != preset.label
                     for r in cells.get((s.label, "gal"), []) if r.get(over_seeds.SEED_KEY) in preset_runs}
        notes = ["ours: val_top1_err (CIFAR-100's test set) at each run's best and final epoch, mean ± sample std "
                 "(ddof=1) over seeds; n = runs (seeds); a diverged run has no final error: its cell gives the epoch "
                 "it diverged at", over_seeds.BEST_NOTE,
                 f"Params: {self.params} (the adjuster's weights without biases, as the paper counts them; the same "
                 "in every seed), in thousands, truncated as the paper prints them",
                 f"MLP {best} is the SGD preset (cifar100_sgd_gal); every other row is the preset with method.kind and "
                 "method.arch changed, nothing else",
                 "claims: MLP beats CNN where the paper's own numbers show it (" + ", ".join(mlp_wins) + "), and MLP "
                 f"{best} is the best MLP (against the best other MLP row we have)"]
        absent = [s for s in rows_settings if (s.label, "gal") not in cells]
        if absent:
            notes.append(over_seeds.left_out_note(absent))
        layout = Layout(
            columns=["Adjuster", "Hidden widths", "n", "Params (ours)", "Params (paper)",
                     f"{over_seeds.ERROR_TITLE}, best epoch (ours)", f"{over_seeds.ERROR_TITLE} (paper)",
                     f"{over_seeds.ERROR_TITLE}, final epoch (ours)"],
            rows=rows,
            caption="Table VIII: the adjuster's type and hidden widths, EfficientNet-B1 on CIFAR-100 with SGD: "
                    "adjuster parameters and top-1 test error (%), mean ± std over seeds",
            notes=notes)
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=markdown(layout), layout=layout, claims=claims, baselines=baselines)


SPEC = AdjusterTable()
