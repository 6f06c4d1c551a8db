"""Render every spec into a temporary directory inside ``out``, then move the files into place: a failure
(missing runs, mixed profiles, a plotting error) leaves the previous reports untouched."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipelines.report import claims as claims_mod
from pipelines.report import index, provenance
from pipelines.report.model import Context, Rendered, Spec
from pipelines.report.records import display_path
from pipelines.report.render import latex, markdown, numbers_csv

CLAIMS_FILES = ["tables/claims.md", "tables/claims.csv", "tables/claims.tex"]


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _render_files(rendered: list[Rendered], tmp: Path, runs_root: str) -> list[str]:
    """Write every output under ``tmp``; returns their paths relative to it."""
    written: list[str] = []
    files: dict[str, list[str]] = {}
    for item in rendered:
        if item.layout is not None:
            stem = f"tables/{item.slug}"
            _write(tmp, f"{stem}.md", markdown(item.layout, heading=item.name))
            _write(tmp, f"{stem}.tex", latex(item.layout, item.slug))
            _write(tmp, f"{stem}.csv", numbers_csv(item.numbers))
            files[item.name] = [f"{stem}.md", f"{stem}.csv", f"{stem}.tex"]
        else:
            _write(tmp, f"figures/{item.slug}.csv", numbers_csv(item.numbers))
            files[item.name] = [*item.files, f"figures/{item.slug}.csv"]
        written += files[item.name]

    claims = [c for item in rendered for c in item.claims]
    claims_layout = claims_mod.layout(claims)
    _write(tmp, "tables/claims.md", markdown(claims_layout, heading="Claims"))
    _write(tmp, "tables/claims.csv", claims_mod.to_csv(claims))
    _write(tmp, "tables/claims.tex", latex(claims_layout, "claims"))
    written += CLAIMS_FILES
    _write(tmp, "index.md", index.render(rendered, markdown(claims_layout), files, runs_root))
    written.append("index.md")

    claimed = {key for c in claims for key in c.keys}
    shown_in = {item.name: files[item.name] + ["index.md"] for item in rendered}
    prov = provenance.build(rendered, shown_in)
    for key, entry in prov["numbers"].items():
        if key in claimed:
            entry["files"] = entry["files"] + CLAIMS_FILES
    _write(tmp, "provenance.json", provenance.dumps(prov))
    written.append("provenance.json")
    return written


def build(runs_root: Path, out: Path, specs: list[Spec], profile: str | None = None) -> list[Rendered]:
    """Render ``specs`` from the runs under ``runs_root`` into ``out``; ReportError leaves ``out`` as it was."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        ctx = Context(runs_root=runs_root, out=tmp, profile=profile)
        for sub in ("tables", "figures"):
            (tmp / sub).mkdir()
        rendered = [spec.render(ctx) for spec in specs]
        written = _render_files(rendered, tmp, display_path(runs_root))
        for rel in written:  # each move is atomic; all rendering is done before the first
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, out / rel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rendered
