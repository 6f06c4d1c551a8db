"""Render every spec into a temporary directory beside ``out``, then put the outputs in place: an error
(inconsistent runs, a plotting error) leaves the previous reports untouched. A spec whose runs are missing is
skipped (a note in index.md) and the others are rendered. An ``out`` that cannot take the reports (a file, a
path below a file, a directory this process cannot write) is refused before any work; what a killed report
left beside ``out`` or in it (``.<name>.tmp-*``, ``.<name>.old-*``) goes on the next run (pipelines.atomic)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipelines.atomic import nearest_existing, replace_dir, temp_dir_beside, write_atomic
from pipelines.report import claims as claims_mod
from pipelines.report import findings, index, provenance
from pipelines.report.model import Context, Rendered, Skipped, Spec
from pipelines.report.records import MissingRuns, ReportError, display_path
from pipelines.report.render import latex, markdown, numbers_csv

DIRS = ("tables", "figures")   # replaced whole, so no file of a skipped or removed spec stays behind
TOPS = ("index.md", "provenance.json")  # written one by one, after DIRS
CLAIMS_FILES = ["tables/claims.md", "tables/claims.csv", "tables/claims.tex"]


def flag_mixed_commits(item: Rendered) -> None:
    """A note under ``item``'s table (and a warning beside it in index.md) naming each cell whose runs come
    from more than one git commit: such runs are averaged, not refused (their data are checked to be alike)."""
    cells = provenance.mixed_commit_cells(item)
    if not cells:
        return
    note = provenance.commits_note(cells)
    if item.layout is not None:
        item.layout.notes.append(note)
    item.markdown = item.markdown.rstrip("\n") + f"\n\n> [!WARNING]\n> {note}.\n"


def _render_files(items: list[Rendered | Skipped], tmp: Path, runs_root: str, names: list[str]) -> dict[str, str]:
    """Write the tables and figures' numbers under ``tmp``; returns index.md and provenance.json's text."""
    rendered = [item for item in items if isinstance(item, Rendered)]
    files: dict[str, list[str]] = {}
    for item in rendered:
        flag_mixed_commits(item)
        if item.layout is not None:
            stem = f"tables/{item.slug}"
            (tmp / f"{stem}.md").write_text(markdown(item.layout, heading=item.name))
            (tmp / f"{stem}.tex").write_text(latex(item.layout, item.slug))
            (tmp / f"{stem}.csv").write_text(numbers_csv(item.numbers))
            files[item.name] = [f"{stem}.md", f"{stem}.csv", f"{stem}.tex"]
        else:
            (tmp / f"figures/{item.slug}.csv").write_text(numbers_csv(item.numbers))
            files[item.name] = [*item.files, f"figures/{item.slug}.csv"]

    claims = [c for item in rendered for c in item.claims]
    claims_layout = claims_mod.layout(claims, [note for item in rendered for note in item.claims_notes])
    (tmp / "tables/claims.md").write_text(markdown(claims_layout, heading="Claims"))
    (tmp / "tables/claims.csv").write_text(claims_mod.to_csv(claims))
    (tmp / "tables/claims.tex").write_text(latex(claims_layout, "claims"))

    claimed = {key for c in claims for key in c.keys}
    shown_in = {item.name: files[item.name] + ["index.md"] for item in rendered}
    prov = provenance.build(rendered, shown_in)
    for key, entry in prov["numbers"].items():
        if key in claimed:
            entry["files"] = entry["files"] + CLAIMS_FILES
    # what we found, read back from the files just written, as the README's block reads a published report
    found = findings.findings(findings.load(tmp, provenance=prov, preflight=False), names=names,
                                banner=False)
    return {"index.md": index.render(items, markdown(claims_layout), files, runs_root, found),
            "provenance.json": provenance.dumps(prov)}


def check_out(out: Path) -> None:
    """ReportError unless ``out`` is, or can be made, a directory this process can put the reports in: what of
    its path exists is a directory, writable where the report makes something (``out`` and its parent, or the
    nearest existing folder above a new ``out``), and no file the report writes there is a directory."""
    path, existing = Path(os.path.abspath(out)), nearest_existing(out)
    if not existing.is_dir():
        what = ("is a file" if existing.is_file() else "is not a directory") if existing == path else \
            f"lies below the file {display_path(existing)}"
        raise ReportError(f"output directory {display_path(out)} {what}; name a directory with --out "
                          "(default: reports)")
    for place in ([path.parent, path] if existing == path else [existing]):
        if not os.access(place, os.W_OK | os.X_OK):
            raise ReportError(f"output directory {display_path(out)}: cannot write in {display_path(place)}; "
                              "name a writable directory with --out or fix its permissions")
    for name in TOPS:
        if (path / name).is_dir():
            raise ReportError(f"output directory {display_path(out)}: {display_path(out / name)} is a directory "
                              "where the report writes a file; move it away")


def build(runs_root: Path, out: Path, specs: list[Spec], profile: str | None = None) -> list[Rendered | Skipped]:
    """Render ``specs`` from the runs under ``runs_root`` into ``out``: each one's Rendered, or Skipped when
    its runs are missing. ReportError (an unusable ``out``, inconsistent runs, or every spec skipped) leaves
    ``out`` as it was."""
    check_out(out)
    tmp = temp_dir_beside(out)
    try:
        ctx = Context(runs_root=runs_root, out=tmp, profile=profile)
        for sub in DIRS:
            (tmp / sub).mkdir()
        items: list[Rendered | Skipped] = []
        for spec in specs:
            try:
                items.append(spec.render(ctx))
            except MissingRuns as err:
                items.append(Skipped(spec.name, spec.slug, spec.kind, err.needs, err.missing, err.make))
        if all(isinstance(item, Skipped) for item in items):
            raise ReportError(f"no table or figure has its runs under {display_path(runs_root)}/ (first: "
                              f"{items[0].name}: {items[0].missing}); make them first (dvc repro)"
                              if items else "no table or figure to render")
        tops = _render_files(items, tmp, display_path(runs_root), [spec.name for spec in specs])
        out.mkdir(parents=True, exist_ok=True)
        for sub in DIRS:  # all rendering is done before the first output is replaced
            replace_dir(tmp / sub, out / sub)
        for name, text in tops.items():
            write_atomic(out / name, text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return items
