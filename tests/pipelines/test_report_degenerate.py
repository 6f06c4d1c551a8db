"""What a reader sees where numbers are degenerate, and every figure at its size: the report rendered (every
spec) from two sets of synthetic records (report_fixtures.make_flat_runs: arms without variance, a ratio over a
zero time; make_sparse_runs: one run per cell, a table's runs missing) says "nan" nowhere, neither in a table
nor on a figure, and no text of a figure overlaps another."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from pipelines.report import over_seeds
from pipelines.report.build import build
from pipelines.report.specs import SPECS
from tests.pipelines.report_fixtures import FIGURES, make_flat_runs, make_sparse_runs

NAN = re.compile(r"\bnan\b", re.IGNORECASE)
SETS = {"flat": make_flat_runs, "sparse": make_sparse_runs}
ALL_FIGURES = [*FIGURES, "protocol_curves"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    """set -> {"out": its reports folder, "figures": slug -> the matplotlib Figure saved}."""
    save = over_seeds.save
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, make in SETS.items():
            root = tmp_path_factory.mktemp(name)
            make(root / "runs")
            figures = {}
            mp.setattr(over_seeds, "save", lambda fig, files, figures=figures: (
                figures.__setitem__(Path(files[0]).stem, fig), save(fig, files)))
            build(root / "runs", root / "reports", SPECS)
            out[name] = {"out": root / "reports", "figures": figures}
    return out


@pytest.mark.parametrize("name", SETS)
def test_no_rendered_table_or_figure_says_nan(rendered, name):
    out = rendered[name]["out"]
    files = [out / "index.md", *sorted((out / "tables").iterdir()), *sorted((out / "figures").glob("*.csv"))]
    assert len(files) > 20
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            assert not NAN.search(line), f"{file.relative_to(out)}:{number}: {line}"
    for slug, fig in rendered[name]["figures"].items():
        texts = [t.get_text() for t in fig.findobj(Text)]
        assert not [t for t in texts if NAN.search(t)], slug


def test_undefined_numbers_say_why(rendered):
    """The degenerate cases are there, each shown as what it means."""
    flat, sparse = rendered["flat"]["out"], rendered["sparse"]["out"]
    assert "| Lookahead | t, p |  | identical, no variance | - | identical, no variance | - |" in \
        (flat / "tables/table2.md").read_text()
    table3 = (flat / "tables/table3.md").read_text()  # top-5 without variance, top-1 with it
    assert re.search(r"\| ResNet-50 \(RMSProp\) \| t, p \|  \|  \|  \| -?\d+\.\d\d, \S+ \| - \| "
                     r"identical, no variance \|", table3)
    table4 = (flat / "tables/table4.md").read_text()
    assert table4.count("| identical, no variance |") == 6 and "the test is undefined" in table4
    claims = (flat / "tables/claims.md").read_text()
    assert "| 4.0000 → 4.0000 (identical, no variance) |" in claims  # Boston MAE, and under the closest protocol
    assert "(distance 0.08): 4.0000 → 4.0000 (identical, no variance) |" in claims
    assert "uniform noise: 11.00 ± 0.00 → learned h: 11.00 ± 0.00 (identical, no variance)" in claims
    table7 = (flat / "tables/table7.md").read_text()
    assert "| CIFAR-10 |  | GAL / Baseline |  | 1.0297 | - |" in table7 and "the ratio is undefined" in table7
    index = (sparse / "index.md").read_text()  # one run: its value alone
    assert re.search(r"\| CIFAR-10 \| EfficientNet-B1, SGD \| GAL \| 1 \| \d\.\d{4} \|", index)
    claims = (sparse / "tables/claims.md").read_text()  # Table V not rendered: its re-check stands alone
    assert "| Table V: GAL better on Boston, MAE (lower) | 3.9535 → 2.8079 (t 5.02, p 1.02e-03) | - → - |" in claims
    assert "| ImageNet |  | GAL | 1 |" in (sparse / "tables/table7.md").read_text()


def tick_labels(axis) -> list[Text]:
    """The labels of ``axis``'s major ticks inside its view (the others are not drawn)."""
    low, high = sorted(axis.get_view_interval())
    along = 0 if axis.axis_name == "x" else 1
    span = 1e-9 * max(abs(low), abs(high), 1)
    return [t for t in axis.get_ticklabels() if low - span <= t.get_position()[along] <= high + span]


def text_boxes(fig) -> list[tuple[str, str, object]]:
    """(owner, what, window extent) of every text of the figure as its PNG draws it: the suptitle and figure
    legends (owner "figure"); per axes (owner "axes <i>") its title, legend, axis labels, offset texts (1e-8)
    and tick labels."""
    FigureCanvasAgg(fig)  # the saved figure is closed: draw it again as its PNG was, at the PNG's resolution
    fig.set_dpi(over_seeds.DPI)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []

    def add(owner: str, what: str, artist) -> None:
        if artist is None or not artist.get_visible() or isinstance(artist, Text) and not artist.get_text():
            return
        box = artist.get_window_extent(renderer)
        if box.width > 0 and box.height > 0:
            boxes.append((owner, what, box))

    add("figure", "suptitle", fig._suptitle)  # matplotlib keeps the suptitle's Text only there
    for i, legend in enumerate(fig.legends):
        add("figure", f"legend {i}", legend)
    for i, ax in enumerate(fig.axes):
        owner = f"axes {i}"
        for what, artist in (("title", ax.title), ("legend", ax.get_legend()), ("x label", ax.xaxis.label),
                             ("y label", ax.yaxis.label), ("x offset", ax.xaxis.get_offset_text()),
                             ("y offset", ax.yaxis.get_offset_text())):
            add(owner, what, artist)
        for axis in (ax.xaxis, ax.yaxis):
            for label in tick_labels(axis):
                add(owner, f"tick label {label.get_text()!r}", label)
    return boxes


def overlap(a, b) -> bool:
    """Whether two boxes share an area (touching edges do not)."""
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("slug", ALL_FIGURES)
def test_figure_text_does_not_overlap(rendered, name, slug):
    fig = rendered[name]["figures"][slug]
    boxes = text_boxes(fig)
    assert any(what == "suptitle" for _, what, _ in boxes) or any(what == "title" for _, what, _ in boxes)
    for owner, what, box in boxes:  # nothing cut off at the edges
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig.bbox.x1 + 1 and box.y1 <= fig.bbox.y1 + 1, \
            f"{slug}: {owner} {what} leaves the figure: {box.extents}"
    for (owner_a, what_a, a), (owner_b, what_b, b) in itertools.combinations(boxes, 2):
        if owner_a == owner_b and what_a.startswith("tick label") and what_b.startswith("tick label"):
            continue  # one axes' tick labels: matplotlib spaces them, and its two axes' meet at the corner
        assert not overlap(a, b), f"{slug}: {owner_a} {what_a} overlaps {owner_b} {what_b}"
