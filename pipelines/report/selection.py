"""Which runs a table or figure takes: ``select``, the report's one way of choosing runs.

A run belongs to a setting (a row, panel or line) by its config.yaml (dotted keys) and run.json's variant,
never by its directory's name or position. By default only a preset's own runs (variant "") are taken; a
setting with ``variant="eps0.001"`` takes the runs made off the preset under that name instead.

A spec that takes whichever values were run off a preset (a sensitivity axis, a protocol study) finds them by
config too: ``preset_config`` is the config of the preset's own runs, ``changed`` the keys in which a run's
config differs from it; a run belongs to a study by the keys it changes, never by how its name spells them.

Absent runs (none at all, a setting or method without runs, a seed one method lacks, too few seeds) raise
MissingRuns: the report skips the spec with a note. Present but inconsistent runs (mixed profiles, two runs
for one seed, runs of one cell whose configs or data differ) raise ReportError: the report refuses. Runs of one
cell from different git commits are taken; the report flags such cells (provenance.mixed_commit_cells).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from pipelines.report.model import Context
from pipelines.report.records import MissingRuns, ReportError, RunRecord, check_one_profile

# Config keys the runs of one cell may differ in: the seed, where files live, and where and on how many
# processes a run went (trainer.*) but its numeric precision, asked for or resolved (auto is bf16 on CUDA,
# fp32 on CPU). The same keys that never make a run's variant (pipelines/training/identity.py, not imported:
# the report imports no training module), so any other difference is refused.
FREE_KEYS = ("seed", "root")
FREE_PREFIXES = ("trainer.",)
BOUND_KEYS = ("trainer.precision", "trainer.resolved_precision")
# Config keys that are no change a run makes off its preset: the profile is checked on its own
# (check_one_profile refuses a run of another profile rather than taking it for a variant)
NOT_CHANGES = ("profile",)

Cells = dict[tuple[str, str], list[RunRecord]]


@dataclass(frozen=True)
class Setting:
    label: str                                 # key segment and paper.yaml name, e.g. "CIFAR-10"
    where: dict[str, Any] = field(default_factory=dict)  # config filters, e.g. {"data.name": "cifar10"}
    detail: str = ""                           # which runs, in words, e.g. "EfficientNet-B1, SGD"
    stage: str = ""                            # the dvc stage that makes its runs, e.g. "train_cifar"
    variant: str = ""                          # run.json's variant: "" takes the preset's own runs
    task: str = ""                             # runs/<task> it reads: "" the one ``select`` is given

    def matches(self, run: RunRecord) -> bool:
        return run.variant == self.variant and all(
            k in run.flat and str(run.flat[k]) == str(v) for k, v in self.where.items())

    @property
    def filters(self) -> str:
        return ", ".join([f"{k}={v}" for k, v in self.where.items()] + [f"variant={self.variant}"] * bool(self.variant))


def select(name: str, ctx: Context, task: str, settings: Sequence[Setting], methods: Sequence[str], *,
           method_key: str = "method.name", seed_key: str = "seed", optional: Sequence[str] = (),
           min_seeds: int = 1) -> tuple[Cells, str]:
    """(setting label, method) -> the runs under runs/<task> (or the setting's own task) of that setting and
    method, sorted by seed, and the runs' profile. Within a setting every method needs the same seeds, at least ``min_seeds`` of them;
    settings named in ``optional`` may lack runs altogether (then they are left out)."""
    tasks = list(dict.fromkeys(s.task or task for s in settings))
    where = " and ".join(ctx.task_dir(t) for t in tasks)
    cells: dict[tuple[str, str], dict[Any, RunRecord]] = {(s.label, m): {} for s in settings for m in methods}
    chosen: list[RunRecord] = []
    for run_task, run in ((t, run) for t in tasks for run in ctx.runs(t)):
        setting = next((s for s in settings if (s.task or task) == run_task and s.matches(run)), None)
        method = str(run.flat.get(method_key))
        if setting is None or method not in methods:
            continue
        cell = cells[(setting.label, method)]
        seed = run.get(seed_key)
        if seed in cell:
            raise ReportError(f"{name}: two runs for {setting.label}/{method} {seed_key}={seed}: {cell[seed].dir} "
                              f"and {run.dir}; remove one")
        cell[seed] = run
        chosen.append(run)
    profile = check_one_profile(name, chosen, ctx.profile) if chosen else "?"
    for cell in cells.values():
        check_same_config(name, [cell[seed] for seed in sorted(cell)])
        check_same_data(name, [cell[seed] for seed in sorted(cell)])

    missing, stages = [], []
    for s in settings:
        seeds = sorted({seed for m in methods for seed in cells[(s.label, m)]})
        if not seeds and s.label in optional:
            for m in methods:
                del cells[(s.label, m)]
            continue
        if not seeds:
            lacking = [f"{s.label}/{','.join(methods)}: no runs"]
        else:
            lacking = [f"{s.label}/{m} {seed_key}={','.join(map(str, absent))}" for m in methods
                       if (absent := [x for x in seeds if x not in cells[(s.label, m)]])]
            if not lacking and len(seeds) < min_seeds:
                lacking = [f"{s.label}: {len(seeds)} {seed_key}(s), at least {min_seeds} needed"]
        missing += [f"{item} ({s.filters})" if s.filters else item for item in lacking]
        if lacking and s.stage not in stages:
            stages.append(s.stage)
    if missing:
        needs = (f"runs under {where} with {_wanted(settings)} x {method_key} in {{{', '.join(methods)}}}, the "
                 f"same {seed_key}s for each {method_key}" + (f" (at least {min_seeds})" if min_seeds > 1 else ""))
        what = f"missing runs under {where}: {'; '.join(missing)}" if chosen else \
            f"no runs under {where} with {_wanted(settings)} x {method_key} in {{{', '.join(methods)}}}"
        raise MissingRuns(name, needs, what, " ".join(["dvc repro", *filter(None, stages)]))
    return {key: [cell[seed] for seed in sorted(cell)] for key, cell in cells.items()}, profile


def _wanted(settings: Sequence[Setting]) -> str:
    """The settings' filters in words: 'experiment in {cifar10_sgd, cifar100_sgd}' when they filter on the same
    keys (and variant), else each one's."""
    keys = list(settings[0].where) if settings else []
    if any(list(s.where) != keys or s.variant != settings[0].variant for s in settings):
        return "; ".join(f"{s.label} ({s.filters})" for s in settings)
    parts = []
    for key in keys:
        values = list(dict.fromkeys(str(s.where[key]) for s in settings))
        parts.append(f"{key}={values[0]}" if len(values) == 1 else f"{key} in {{{', '.join(values)}}}")
    return " x ".join(parts) + (f" (variant {settings[0].variant})" if settings[0].variant else "")


def may_differ(key: str) -> bool:
    """Whether the runs of one cell may differ in config ``key`` (FREE_KEYS, FREE_PREFIXES)."""
    return key in FREE_KEYS or (key.startswith(FREE_PREFIXES) and key not in BOUND_KEYS)


def config_of(run: RunRecord) -> dict[str, Any]:
    """``run``'s config (dotted keys) apart from the free keys."""
    return {k: v for k, v in run.flat.items() if not may_differ(k)}


def preset_config(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """The config of the preset ``runs`` (one setting and method) were made from, apart from the free keys and
    the profile: its own runs' (run.json variant "") where ``runs`` hold some, else per key the value most of
    ``runs`` share (a run off a preset changes a few keys, so the preset's value is the commonest); a key most of
    them lack is left out."""
    own = [run for run in runs if not run.variant] or list(runs)
    configs = [config_of(run) for run in own]
    reference: dict[str, Any] = {}
    for key in dict.fromkeys(k for config in configs for k in config if k not in NOT_CHANGES):
        values = {_text(config, key): config.get(key) for config in configs}
        text, _ = Counter(_text(config, key) for config in configs).most_common(1)[0]  # ties: the first run's
        if text is not None:
            reference[key] = values[text]
    return reference


def changed(run: RunRecord, reference: dict[str, Any]) -> list[str]:
    """The config keys, sorted, in which ``run`` differs from ``reference`` (``preset_config``), the free keys
    and the profile aside: [] for the preset's own runs, e.g. ["method.ratio"] for a run that changes eps alone."""
    config = {k: v for k, v in config_of(run).items() if k not in NOT_CHANGES}
    return sorted(k for k in {*config, *reference} if config.get(k, ...) != reference.get(k, ...))


def _text(config: dict[str, Any], key: str) -> str | None:
    """A value as counted: its JSON (None where the key is absent)."""
    return json.dumps(config[key], sort_keys=True, default=str) if key in config else None


def check_same_config(name: str, runs: list[RunRecord]) -> None:
    """ReportError naming the odd run and its first differing keys unless ``runs`` (aggregated into one
    number) share their config apart from the free keys. The config most of them share is the reference."""
    configs = [config_of(run) for run in runs]
    texts = [json.dumps(config, sort_keys=True, default=str) for config in configs]
    counts = Counter(texts)
    ref = max(range(len(runs)), key=lambda i: counts[texts[i]], default=0)  # ties: the lowest seed
    for run, config in zip(runs, configs):
        keys = sorted(k for k in {*config, *configs[ref]} if config.get(k, ...) != configs[ref].get(k, ...))
        if keys:
            shown = ", ".join(f"{k} ({_show(configs[ref], k)} vs {_show(config, k)})" for k in keys[:3])
            raise ReportError(f"{name}: {run.dir} differs from {runs[ref].dir} in config {shown}"
                              f"{' and more' if len(keys) > 3 else ''}; runs aggregated together may differ only in "
                              f"{', '.join([*FREE_KEYS, *(p + '*' for p in FREE_PREFIXES)])} (not in precision): rerun the odd run or "
                              f"remove it")


def _show(config: dict[str, Any], key: str) -> str:
    return json.dumps(config[key], default=str) if key in config else "<absent>"


def check_same_data(name: str, runs: list[RunRecord]) -> None:
    """ReportError naming two runs and a data file they differ in unless ``runs`` (aggregated into one number)
    were trained on the same data: run.json's ``data_checksums`` alike, the same files with the same checksums
    (a record without them differs from one with them). The checksums most of them share are the reference."""
    checks = [run.meta.get("data_checksums") for run in runs]
    checks = [check if isinstance(check, dict) else {} for check in checks]
    texts = [json.dumps(check, sort_keys=True, default=str) for check in checks]
    counts = Counter(texts)
    ref = max(range(len(runs)), key=lambda i: counts[texts[i]], default=0)  # ties: the lowest seed
    for run, check in zip(runs, checks):
        paths = sorted(p for p in {*check, *checks[ref]} if check.get(p) != checks[ref].get(p))
        if paths:
            shown = ", ".join(f"{p} ({checks[ref].get(p, '<absent>')} vs {check.get(p, '<absent>')})"
                              for p in paths[:2])
            raise ReportError(f"{name}: {run.dir} and {runs[ref].dir} were trained on different data: {shown}"
                              f"{' and more' if len(paths) > 2 else ''} (run.json data_checksums); runs aggregated "
                              "together must share their data: rerun the stale runs (dvc repro) or remove them")
