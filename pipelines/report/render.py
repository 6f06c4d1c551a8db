"""Writing a Layout as Markdown / LaTeX and a spec's numbers as tidy CSV; number formatting."""
from __future__ import annotations

import csv
import io
import math
import re
from typing import Any, Iterable, Sequence

from pipelines.report.model import Layout, Number


NONE = "-"                                # a number there is not (the paper gives none, a std of one run, ...)
NO_VARIANCE = "identical, no variance"    # a t-test of two arms whose runs all gave one and the same value
TOO_FEW = "too few runs"                  # a t-test of fewer than 3 runs in all (no degree of freedom)
UNDEFINED_NOTE = (f"{NO_VARIANCE}: every run of both arms gave one and the same value, so Student's t is 0/0 and "
                  f"the test is undefined (the arms do not differ); {TOO_FEW}: fewer than 3 runs in all")


def missing(value: Any) -> bool:
    """None or nan: no number to show."""
    return value is None or math.isnan(float(value))


def fmt(value: Any, digits: int = 4) -> str:
    """Fixed-point with ``digits`` decimals; None and nan as '-', never 'nan'."""
    return NONE if missing(value) else f"{float(value):.{digits}f}"


def fmt_p(value: Any) -> str:
    """A p-value as the paper prints it: 1.02e-03; None and nan as '-'."""
    return NONE if missing(value) else f"{float(value):.2e}"


def pm(mean: Any, std: Any, digits: int = 4) -> str:
    """"mean ± std"; the mean alone where there is no std (the paper's single runs, a std of one run)."""
    if missing(mean):
        return NONE
    return fmt(mean, digits) if missing(std) else f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def fmt_g(value: Any, digits: int = 3) -> str:
    """``digits`` significant digits, for numbers of any scale (1.23e-08, 0.74); None and nan as '-'."""
    return NONE if missing(value) else f"{float(value):.{digits}g}"


def pm_numbers(mean: Number, std: Number) -> str:
    """pm of two rendered Numbers, each as its text shows it."""
    return mean.text if missing(std.value) else f"{mean.text} ± {std.text}"


def ttest_text(op: str, value: float, groups: Sequence[Sequence[float]]) -> str:
    """Student's t (2 decimals) or its p (1.02e-03) as a table shows it; where the test is undefined (nan: 0/0),
    why, in words: NO_VARIANCE, or TOO_FEW when the groups hold fewer than 3 runs together."""
    if not math.isnan(value):
        return fmt(value, 2) if op == "t" else fmt_p(value)
    return TOO_FEW if sum(len(g) for g in groups) < 3 or min(map(len, groups)) < 1 else NO_VARIANCE


def ttest_cell(t: Number, p: Number) -> str:
    """A "t, p" cell; the reason alone (ttest_text) where the test is undefined."""
    return t.text if math.isnan(t.value) else f"{t.text}, {p.text}"


def csv_value(value: Any) -> str:
    """A number in a CSV: repr (round-trips through float()), nan as an empty cell (a missing value, as CSV
    readers take it), so no table the report writes says "nan"."""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return repr(value)


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
        writer.writerow([n.key, *(n.fields.get(f, "") for f in fields), csv_value(n.value), n.text, paper,
                         n.aggregation])
    return buf.getvalue()


def rows_csv(columns: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()
