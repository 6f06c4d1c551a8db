"""The report's figures on synthetic run records: Fig. 4 (toy3d), Figs. 5, 6 and 8b (classification and
detection), and the ablations' Figs. 7 (sensitivity: points, preset marker, baseline) and 8a (update policies)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.report import over_seeds
from pipelines.report.model import Context
from tests.pipelines.report_fixtures import (CLS_SEEDS, FIGURES, abl_error, abl_values, by_key, cls_last, cls_values,
                                             ours, read_csv, surface)


def test_fig4_numbers_and_figure(site):
    rows = {r["key"]: r for r in read_csv(site["out"] / "figures/fig4_toy3d.csv")}
    z = surface(0.75 + (0.2 - 0.75), 1.0 + (-0.4 - 1.0))
    assert float(rows["Fig. 4/Lookahead(GD)/GAL/final_z"]["value"]) == pytest.approx(z)
    assert (site["out"] / "figures/fig4_toy3d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"CreationDate" not in (site["out"] / "figures/fig4_toy3d.pdf").read_bytes()


def test_classification_figures(site):
    out = site["out"]
    for fig in FIGURES[1:]:
        assert (out / f"figures/{fig}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"CreationDate" not in (out / f"figures/{fig}.pdf").read_bytes()
    fig5 = {r["key"]: r for r in read_csv(out / "figures/fig5_val_loss.csv")}
    assert len(fig5) == 4 * 2 * 3  # CIFAR-10, CIFAR-100, ImageNet, COCO x baseline, GAL x mean, std, n
    coco = [json.loads((site["root"] / f"runs/detection/coco_detr_r50-gal-s{seed}/metrics.json").read_text())["val_loss"]
            for seed in CLS_SEEDS]
    for label, v in (("CIFAR-10", cls_values("cifar10_sgd", "gal", "val_loss")),
                     ("ImageNet", cls_values("imagenet_resnet50", "gal", "val_loss")), ("COCO", coco)):
        assert float(fig5[f"Fig. 5/{label}/GAL/val_loss/mean"]["value"]) == pytest.approx(np.mean(v), rel=1e-12)
        assert float(fig5[f"Fig. 5/{label}/GAL/val_loss/std"]["value"]) == pytest.approx(np.std(v, ddof=1), rel=1e-12)
    fig6_rows = {r["key"]: r for r in read_csv(out / "figures/fig6_remainder_cosine.csv")}
    for model, exp in (("ResNet-50", "imagenet_resnet50"), ("EfficientNet-B2", "imagenet_efficientnet_b2")):
        for column in ("remainder", "cosine"):  # history.csv's last row: not in metrics.json
            value = float(fig6_rows[f"Fig. 6/{model}/GAL/{column}/mean"]["value"])
            assert value == pytest.approx(np.mean(cls_last(exp, column)), rel=1e-12)
    fig8 = {r["key"]: r for r in read_csv(out / "figures/fig8b_adjusted_better.csv")}
    assert sorted(fig8) == sorted(f"Fig. 8b/{d}/GAL/adjusted_better/{op}" for d in ("CIFAR-10", "CIFAR-100", "ImageNet")
                                  for op in ("mean", "std"))
    assert float(fig8["Fig. 8b/CIFAR-100/GAL/adjusted_better/mean"]["value"]) == \
        pytest.approx(np.mean(cls_last("cifar100_sgd", "adjusted_better")), rel=1e-12)
    text = (out / "index.md").read_text()
    assert all(f"(figures/{fig}.png)" in text for fig in FIGURES)
    # Fig. 6 names what it plots: gal_core's remainder and cosine statistics
    assert "final remainder \\|L(z-δ) - L + ⟨δ, g⟩\\| (mean ± std) | final cos(g, â) (mean ± std) |" in text
    numbers = json.loads((out / "provenance.json").read_text())["numbers"]
    for fig in FIGURES[1:]:
        for row in read_csv(out / f"figures/{fig}.csv"):
            assert numbers[row["key"]]["runs"] and numbers[row["key"]]["dvc_repro"], row["key"]
    assert numbers["Fig. 8b/ImageNet/GAL/adjusted_better/mean"]["dvc_repro"] == \
        [f"train_classification@imagenet_resnet50-gal-{s}" for s in CLS_SEEDS]


def test_fig7_points_and_preset_marker(site, tmp_path, monkeypatch):
    from pipelines.report.specs import fig7

    rows = by_key(site["out"] / "figures/fig7_sensitivity.csv")
    sgd, la = abl_values("cifar100_sgd", ""), abl_values("cifar100_lookahead", "")
    points = {("SGD", "eps", "0.01"): sgd, ("SGD", "eps", "0.001"): abl_values("cifar100_sgd", "eps0.001"),
              ("SGD", "eps", "0.1"): abl_values("cifar100_sgd", "eps0.1"), ("SGD", "s", "1"): sgd,
              ("SGD", "s", "5"): abl_values("cifar100_sgd", "scale5"), ("SGD", "architecture", "256-64-32"): sgd,
              ("SGD", "architecture", "256"): abl_values("cifar100_sgd", "mlp-256"),
              ("SGD", "architecture", "256-64-32-16"): abl_values("cifar100_sgd", "mlp-256-64-32-16"),
              ("Lookahead", "eps", "0.001"): la,
              ("Lookahead", "eps", "0.01"): abl_values("cifar100_lookahead", "eps0.01"),
              ("Lookahead", "s", "5"): la, ("Lookahead", "s", "0.5"): abl_values("cifar100_lookahead", "scale0.5"),
              ("Lookahead", "architecture", "256-64-32"): la,
              ("Lookahead", "architecture", "256"): abl_values("cifar100_lookahead", "mlp-256")}
    for (opt, axis, x), v in points.items():
        key = f"Fig. 7/{opt}/{axis}/{x}/val_top1_err"
        assert float(rows[f"{key}/mean"]["value"]) == pytest.approx(np.mean(v), rel=1e-12)
        assert float(rows[f"{key}/std"]["value"]) == pytest.approx(np.std(v, ddof=1), rel=1e-12)
    assert len({k.rsplit("/", 2)[0] for k in rows}) == len(points) + 2  # and the two baselines
    assert float(rows["Fig. 7/SGD/baseline/val_top1_err/mean"]["value"]) == \
        pytest.approx(np.mean(cls_values("cifar100_sgd", "baseline", "val_top1_err")), rel=1e-12)
    md = (site["out"] / "index.md").read_text().split("## Fig. 7\n")[1].split("\n## ")[0]
    assert f"| SGD | eps | 0.01 | the paper's setting (preset) | 3 | {ours(sgd)} |" in md
    assert f"| Lookahead | s | 0.5 | variant scale0.5 | 2 | {ours(abl_values('cifar100_lookahead', 'scale0.5'))} |" in md

    figures = []  # the plotted figure: the preset's marker sits at the preset's mean, the others in x order
    save = over_seeds.save
    monkeypatch.setattr(over_seeds, "save", lambda fig, files: (figures.append(fig), save(fig, files)))
    monkeypatch.chdir(site["root"])
    (tmp_path / "figures").mkdir()
    fig7.SPEC.render(Context(runs_root=Path("runs"), out=tmp_path))
    axes = figures[0].axes
    assert [ax.get_xscale() for ax in axes] == ["log", "log", "linear"] * 2
    for ax, (opt, x, values) in zip(axes, [("SGD", 0.01, sgd), ("SGD", 1, sgd), ("SGD", 1, sgd),
                                           ("Lookahead", 0.001, la), ("Lookahead", 5, la), ("Lookahead", 1, la)]):
        star = [line for line in ax.get_lines() if line.get_marker() == "*"]
        assert len(star) == 1 and list(star[0].get_xdata()) == [x]
        assert list(star[0].get_ydata()) == [pytest.approx(np.mean(values), rel=1e-12)]
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1  # the baseline
    assert [t.get_text() for t in axes[2].get_xticklabels()] == ["256", "256-64-32", "256-64-32-16"]


def test_fig8a_policies(site):
    out = site["out"]
    assert (out / "figures/fig8a_update_policies.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = by_key(out / "figures/fig8a_update_policies.csv")
    for label, variant in (("Line 7 (<=)", ""), ("Line 7 (<)", "policy-strict"), ("Line 8", "policy-always"),
                           ("Line 10", "policy-never")):
        v = abl_values("cifar100_sgd", variant)
        assert float(rows[f"Fig. 8a/{label}/val_top1_err/mean"]["value"]) == pytest.approx(np.mean(v), rel=1e-12)
        assert float(rows[f"Fig. 8a/{label}/val_top1_err/n"]["value"]) == len(v)
    md = (out / "index.md").read_text().split("## Fig. 8a\n")[1].split("\n## ")[0]
    assert "(figures/fig8a_update_policies.png)" in md
    assert "| Line 10 | never | never: the plain step (h still learns) | 1 | " \
           f"{abl_error('cifar100_sgd', 'policy-never', 0):.2f} |" in md
