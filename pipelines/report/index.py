"""reports/index.md: what we found (pipelines/report/findings.py), every table inline, every figure embedded, the
profile in the title, a loud warning when the runs come from the smoke profile, and a note for every spec skipped
because its runs are missing."""
from __future__ import annotations

from pipelines.report import recipe
from pipelines.report.model import Rendered, Skipped

SMOKE = "smoke"


def profile_title(rendered: list[Rendered]) -> str:
    profiles = sorted({r.profile for r in rendered})
    if len(profiles) == 1:
        return f"profile `{profiles[0]}`"
    return "profiles " + ", ".join(f"`{r.profile}` ({r.name})" for r in rendered)


def smoke_banner(rendered: list[Rendered]) -> str:
    smoke = [r.name for r in rendered if r.profile == SMOKE]
    if not smoke:
        return ""
    if len(smoke) == len(rendered):
        what = "every number below comes from fixture-sized data and means nothing about the paper"
    else:
        what = f"the numbers of {', '.join(smoke)} come from fixture-sized data and mean nothing about the paper"
    return ("> [!WARNING]\n"
            f"> **SMOKE PROFILE: {what}.**\n"
            "> The smoke profile only shows that every stage runs end to end. For real numbers rerun with "
            "`profile=regression` (Table V, CPU) or `profile=paper` (the paper's full protocol).\n\n")


def runs_line(item: Rendered) -> str:
    """'30 runs from git commit 0123abc (2 with uncommitted changes)'."""
    runs = list({run.dir: run for n in item.numbers for run in n.runs}.values())
    commits = sorted({str(run.meta.get("git_commit"))[:7] for run in runs})
    dirty = sum(run.meta.get("git_dirty") is True for run in runs)
    text = f"{len(runs)} runs from git commit{'s' * (len(commits) > 1)} {', '.join(commits)}"
    return text + (f" ({dirty} with uncommitted changes)" if dirty else "")


def skipped_banner(skipped: list[Skipped]) -> str:
    if not skipped:
        return ""
    return ("> [!WARNING]\n"
            f"> **Not rendered, their runs are missing: {', '.join(s.name for s in skipped)}.** Their sections below "
            "say which runs and the command that makes them; the claims table and provenance.json lack them.\n\n")


def skipped_note(item: Skipped) -> str:
    return (f"## {item.name}\n\n> [!NOTE]\n> **Skipped: its runs are missing.** It needs {item.needs}.\n>\n"
            f"> {item.missing[0].upper()}{item.missing[1:]}.\n>\n"
            f"> Make them with `{item.make}`, then rerun `python -m pipelines.report`.\n\n")


def render(items: list[Rendered | Skipped], claims_md: str, files: dict[str, list[str]], runs_root: str,
           findings_md: str = "") -> str:
    """index.md for the specs' results in order, after what we found: Rendered ones shown, Skipped ones as a note."""
    rendered = [item for item in items if isinstance(item, Rendered)]
    skipped = [item for item in items if isinstance(item, Skipped)]
    parts = [f"# GAL reproduction: results ({profile_title(rendered)})\n\n", smoke_banner(rendered),
             skipped_banner(skipped),
             f"Rendered by `python -m pipelines.report` from the run records under `{runs_root}/`; the paper's "
             "numbers come from `pipelines/report/paper.yaml`. Every number is traced in "
             "[provenance.json](provenance.json) (value, aggregation, runs, MLflow run ids, git commits, "
             "`dvc repro` targets); to walk one back and cross-check it against MLflow, run e.g. "
             "`python -m pipelines.audit \"Table V\" Boston GAL MAE`.\n\n"]
    if findings_md:
        parts.append("## What we found\n\n" + findings_md + "\n")
    for item in items:
        if isinstance(item, Skipped):
            parts.append(skipped_note(item))
            continue
        links = " · ".join(f"[{f.rsplit('.', 1)[-1]}]({f})" for f in files[item.name])
        parts.append(f"## {item.name}\n\nProfile `{item.profile}`; {runs_line(item)}. Files: {links}\n\n")
        parts.append(item.markdown + "\n")
    parts.append("## Claims\n\nFiles: [md](tables/claims.md) · [csv](tables/claims.csv) · "
                 "[tex](tables/claims.tex)\n\n" + claims_md)
    parts.append("\n## The recipe\n\nWhere the paper's text, the authors' scripts and our presets could part: the "
                 "value every paper preset composes to and its source (`pipelines/report/recipe.yaml`, checked "
                 "against the presets by the tests).\n\n" + recipe.markdown())
    return "".join(parts)
