"""Writing a Layout as Markdown / LaTeX and a spec's numbers as tidy CSV; number formatting."""
from __future__ import annotations

import csv
import io
import math
import re
from typing import Any, Iterable

from pipelines.report.model import Layout, Number


def fmt(value: Any, digits: int = 4) -> str:
    """Fixed-point with ``digits`` decimals; nan/None as 'nan'/'-'."""
    if value is None:
        return "-"
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def fmt_p(value: Any) -> str:
    """A p-value as the paper prints it: 1.02e-03."""
    if value is None:
        return "-"
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.2e}"


def pm(mean: Any, std: Any, digits: int = 4) -> str:
    """"mean ± std"; the mean alone where there is no std (the paper's single runs)."""
    if mean is None:
        return "-"
    return fmt(mean, digits) if std is None else f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def markdown(layout: Layout, heading: str | None = None) -> str:
    def row(cells: Iterable[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [f"### {heading}", ""] if heading else []
    if layout.caption:
        lines += [layout.caption, ""]
    lines += [row(layout.columns), row("---" for _ in layout.columns)]
    lines += [row(r) for r in layout.rows]
    if layout.notes:
        lines += [""] + [f"- {note}" for note in layout.notes]
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_SYMBOLS = {"±": r"$\pm$", "²": r"$^2$", "→": r"$\to$", "≥": r"$\geq$", "<": r"$<$", "×": r"$\times$"}


def tex_escape(text: str) -> str:
    out = re.sub(r"[\\&%$#_{}~^]", lambda m: _TEX_ESCAPES[m.group()], str(text))
    for symbol, tex in _TEX_SYMBOLS.items():
        out = out.replace(symbol, tex)
    return out


def latex(layout: Layout, label: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    cols = "l" * len(layout.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small"]
    if layout.caption:
        lines.append(rf"\caption{{{tex_escape(layout.caption)}}}")
    lines += [rf"\label{{tab:{label}}}", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
              " & ".join(tex_escape(c) for c in layout.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in layout.rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def numbers_csv(numbers: list[Number]) -> str:
    """One row per rendered number: its provenance key, descriptive fields, ours, paper, how it was made."""
    fields: list[str] = []
    for number in numbers:
        fields += [f for f in number.fields if f not in fields]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["key", *fields, "value", "text", "paper", "aggregation"])
    for n in numbers:
        paper = "" if n.paper is None else n.paper
        writer.writerow([n.key, *(n.fields.get(f, "") for f in fields), repr(n.value), n.text, paper,
                         n.aggregation])
    return buf.getvalue()


def rows_csv(columns: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()
