"""The report's tables on synthetic run records: Tables I-III, V and VII's numbers against numpy/scipy, the
paper's beside ours, and the ablation tables VI (noise, diverged runs) and VIII (adjusters, rows left out)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from pipelines.report.model import Context
from tests.pipelines.report_fixtures import (ABL_SEEDS, DATASETS, METHODS, METRICS, abl_best, abl_error, abl_values,
                                             by_key, cls_best, cls_values, edit_run, make_runs, ours, read_csv,
                                             values_of)


def test_table5_means_and_stds_equal_numpy(site):
    rows = {r["key"]: r for r in read_csv(site["out"] / "tables/table5.csv")}
    for ds, ds_name in DATASETS.items():
        for method, method_name in METHODS.items():
            for metric in METRICS:
                v = values_of(ds, method, metric)
                base = f"Table V/{ds_name}/{method_name}/{metric}"
                assert float(rows[f"{base}/mean"]["value"]) == pytest.approx(np.mean(v), rel=1e-12)
                assert float(rows[f"{base}/std"]["value"]) == pytest.approx(np.std(v, ddof=1), rel=1e-12)
                assert float(rows[f"{base}/n"]["value"]) == 5
    boston = rows["Table V/Boston/GAL/MAE/mean"]
    assert (boston["paper"], boston["text"]) == ("2.8079", f"{np.mean(values_of('boston', 'gal', 'MAE')):.4f}")


def test_table5_ttests_equal_scipy(site):
    rows = {r["key"]: r for r in read_csv(site["out"] / "tables/table5.csv")}
    for ds, ds_name in DATASETS.items():
        for metric in METRICS:
            expected = stats.ttest_ind(values_of(ds, "baseline", metric), values_of(ds, "gal", metric),
                                       equal_var=True)
            key = f"Table V/{ds_name}/t-test/{metric}"
            assert float(rows[f"{key}/t"]["value"]) == pytest.approx(expected.statistic, rel=1e-12)
            assert float(rows[f"{key}/p"]["value"]) == pytest.approx(expected.pvalue, rel=1e-12)
    # the sign convention: baseline minus GAL, so GAL's lower Boston MAE gives t > 0, its higher R2 t < 0
    assert float(rows["Table V/Boston/t-test/MAE/t"]["value"]) > 0 > float(rows["Table V/Boston/t-test/R2/t"]["value"])


def test_table5_shows_the_paper_beside_ours(site):
    md = (site["out"] / "tables/table5.md").read_text()
    assert "3.9535 ± 0.4307" in md and "5.02, 1.02e-03" in md and "-5.78, 4.14e-04" in md
    ours = f"{np.mean(values_of('boston', 'gal', 'MAE')):.4f} ± {np.std(values_of('boston', 'gal', 'MAE'), ddof=1):.4f}"
    assert ours in md
    tex = (site["out"] / "tables/table5.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"R$^2$" in tex


CIFAR_TABLES = {"Table I": ("table1", "cifar10"), "Table II": ("table2", "cifar100")}
CIFAR_OPTIMIZERS = {"sgd": "SGD", "lookahead": "Lookahead", "adabound": "AdaBound"}
IMAGENET_MODELS = {"resnet50": "ResNet-50 (RMSProp)", "efficientnet_b2": "EfficientNet-B2"}
PAPER_METHODS = {"baseline": "Reproduced", "gal": "GAL"}


def test_tables_1_2_equal_numpy_and_scipy(site):
    for table, (slug, ds) in CIFAR_TABLES.items():
        rows = {r["key"]: r for r in read_csv(site["out"] / f"tables/{slug}.csv")}
        for opt, opt_name in CIFAR_OPTIMIZERS.items():
            exp = f"{ds}_{opt}"
            for method, method_name in PAPER_METHODS.items():
                for name, v in (("error", cls_best(exp, method, "val_top1_err")),  # the authors' "Best err"
                                ("final_error", cls_values(exp, method, "val_top1_err"))):
                    key = f"{table}/{opt_name}/{method_name}/{name}"
                    assert float(rows[f"{key}/mean"]["value"]) == pytest.approx(np.mean(v), rel=1e-12)
                    assert float(rows[f"{key}/std"]["value"]) == pytest.approx(np.std(v, ddof=1), rel=1e-12)
                    assert rows[f"{key}/mean"]["text"] == f"{np.mean(v):.2f}" and rows[f"{key}/n"]["value"] == "3.0"
                assert rows[f"{table}/{opt_name}/{method_name}/final_error/mean"]["paper"] == ""
            expected = stats.ttest_ind(cls_best(exp, "baseline", "val_top1_err"),
                                       cls_best(exp, "gal", "val_top1_err"), equal_var=True)
            assert float(rows[f"{table}/{opt_name}/t-test/error/t"]["value"]) == pytest.approx(expected.statistic)
            assert float(rows[f"{table}/{opt_name}/t-test/error/p"]["value"]) == pytest.approx(expected.pvalue)
    assert read_csv(site["out"] / "tables/table1.csv")[0]["optimiser"] == "SGD"
    md = (site["out"] / "tables/table2.md").read_text()
    assert "| SGD | Reproduced | 3 |" in md and "11.81 ± 0.10" in md and "11.37 ± 0.10" in md  # the paper's
    assert "| PreResNet-110 (Lookahead) | quoted (not rerun) |" in md and "21.63" in md
    claims = [r for r in read_csv(site["out"] / "tables/claims.csv") if r["table"] in CIFAR_TABLES]
    assert len(claims) == 6 and {c["metric"] for c in claims} == {"Top-1 error (%), best epoch"}
    assert "optimistic, since the set that picks the epoch also scores it" in md
    assert {c["direction_reproduced"] for c in claims} == {"True"}  # GAL's synthetic error is 0.1 lower


def test_table3_accuracies_params_and_references(site):
    rows = {r["key"]: r for r in read_csv(site["out"] / "tables/table3.csv")}
    for model, model_name in IMAGENET_MODELS.items():
        for method, method_name in PAPER_METHODS.items():
            exp = f"imagenet_{model}"
            for key, v in (("top1", 100 - cls_best(exp, method, "val_top1_err")),  # top-5 at the best top-1 epoch
                           ("top5", 100 - cls_best(exp, method, "val_top5_err")),
                           ("final_top1", cls_values(exp, method, "val_top1_acc")),
                           ("final_top5", cls_values(exp, method, "val_top5_acc"))):
                base = f"Table III/{model_name}/{method_name}/{key}"
                assert float(rows[f"{base}/mean"]["value"]) == pytest.approx(np.mean(v), rel=1e-12)
                assert float(rows[f"{base}/std"]["value"]) == pytest.approx(np.std(v, ddof=1), rel=1e-12)
    assert rows["Table III/ResNet-50 (RMSProp)/GAL/params_model/mean"]["text"] == "23.5M"
    assert rows["Table III/ResNet-50 (RMSProp)/GAL/params_adjuster/mean"]["text"] == "+0.70M"  # 705536, truncated
    assert rows["Table III/ResNet-50 (RMSProp)/GAL/params_adjuster/mean"]["paper"] == "23.5M+0.70M"
    assert "Table III/ResNet-50 (RMSProp)/Reproduced/params_adjuster/mean" not in rows  # no adjuster: not shown
    md = (site["out"] / "tables/table3.md").read_text()
    assert "| Model | Method | n | Params (ours) | Params (paper) | Top-1 acc. (%), best epoch (ours) |" in md
    assert "| ResNet-50 (RMSProp) | Reproduced | 3 | 23.5M | 23.5M |" in md
    assert "| ResNet-50 (RMSProp) | GAL | 3 | 23.5M+0.70M | 23.5M+0.70M |" in md
    assert "| EfficientNet-B2 | GAL | 3 | 9.1M+0.90M | 9.2M+0.90M |" in md
    assert "| ResNet-50 (SGD) | quoted (not rerun) |  |  | - |  | 76.15 |  | 92.87 |  | - |  | - |" in md
    claims = [r for r in read_csv(site["out"] / "tables/claims.csv") if r["table"] == "Table III"]
    assert len(claims) == 4 and {c["better"] for c in claims} == {"higher"}


def test_table7_times_and_ratios(site):
    rows = {r["key"]: r for r in read_csv(site["out"] / "tables/table7.csv")}
    for label, exp in (("ImageNet", "imagenet_resnet50"), ("CIFAR-10", "cifar10_sgd"), ("CIFAR-100", "cifar100_sgd")):
        for metric, key in (("time_per_image", "time"), ("time_per_step", "step_time")):  # ours, the authors'
            base, gal = cls_values(exp, "baseline", metric), cls_values(exp, "gal", metric)
            assert float(rows[f"Table VII/{label}/Baseline/{key}/mean"]["value"]) == pytest.approx(np.mean(base), rel=1e-12)
            assert float(rows[f"Table VII/{label}/GAL/{key}/mean"]["value"]) == pytest.approx(np.mean(gal), rel=1e-12)
            ratio = rows[f"Table VII/{label}/ratio/{key}/ratio"]
            assert float(ratio["value"]) == pytest.approx(np.mean(gal) / np.mean(base), rel=1e-12)
    assert rows["Table VII/ImageNet/GAL/step_time/mean"]["paper"] == "0.4027"  # beside the authors' kind of time
    assert rows["Table VII/ImageNet/GAL/time/mean"]["paper"] == ""
    md = (site["out"] / "tables/table7.md").read_text()
    assert "| ImageNet |  | GAL / Baseline |  |" in md and "| 1.0307 |" in md  # 0.4027 / 0.3907
    assert "SGD runs" in md and "proc_time" in md and "Time / step (s) (ours)" in md


def test_table6_noise_rows_and_divergence(site):
    out = site["out"]
    rows = by_key(out / "tables/table6.csv")
    final = {"Baseline": cls_values("cifar100_sgd", "baseline", "val_top1_err"),
             "Learned h": abl_values("cifar100_sgd", ""), "Uniform": abl_values("cifar100_sgd", "src-uniform"),
             "Normal": abl_values("cifar100_sgd", "src-normal"),
             "Normal unnormalised": abl_values("cifar100_sgd", "norm-false-src-normal")}
    best = {**final, "Baseline": cls_best("cifar100_sgd", "baseline", "val_top1_err"),
            "Learned h": abl_best("cifar100_sgd", "")}  # the noise runs' best epoch is their last
    for key, expected in (("error", best), ("final_error", final)):
        for label, v in expected.items():
            assert float(rows[f"Table VI/{label}/{key}/mean"]["value"]) == pytest.approx(np.mean(v), rel=1e-12)
            if len(v) > 1:
                std = float(rows[f"Table VI/{label}/{key}/std"]["value"])
                assert std == pytest.approx(np.std(v, ddof=1), rel=1e-12)
    assert float(rows["Table VI/Uniform/error/mean"]["value"]) == pytest.approx(11.9, rel=1e-12)  # the centre
    # every unnormalised uniform run diverged: no error at all, the epoch of each run instead
    assert not [k for k in rows if k.startswith("Table VI/Uniform unnormalised/error/")]
    for seed in ABL_SEEDS:
        epoch = rows[f"Table VI/Uniform unnormalised/diverged_epoch/seed{seed}"]
        assert (epoch["value"], epoch["text"]) == ("2.0", "2")
    assert rows["Table VI/Normal unnormalised/error/n"]["value"] == "1.0"  # the diverged seed is not averaged in
    assert rows["Table VI/Normal unnormalised/diverged_epoch/seed0"]["text"] == "3"
    md = (out / "tables/table6.md").read_text()
    assert ("| Adjustment | Normalised (Eq. 4) | n | Top-1 error (%), best epoch (ours) | Top-1 error (%), final epoch "
            "(ours) |") in md
    assert f"| learned h (GAL) | yes | 3 | {ours(best['Learned h'])} | {ours(final['Learned h'])} |" in md
    assert f"| uniform noise | yes | 2 | {ours(best['Uniform'])} | {ours(final['Uniform'])} |" in md
    assert "| uniform noise | no | 2 | diverged (epoch 2) | diverged (epoch 2) |" in md
    other = abl_error("cifar100_sgd", "norm-false-src-normal", 1)
    assert f"| normal noise | no | 2 | 1 of 2 diverged (epoch 3); others {other:.2f} |" in md
    assert "optimistic, since the set that picks the epoch also scores it" in md
    assert "not in our text" in md and "the paper reports that unnormalised noise diverges" in md
    assert r"\begin{tabular}" in (out / "tables/table6.tex").read_text()
    numbers = json.loads((out / "provenance.json").read_text())["numbers"]
    entry = numbers["Table VI/Uniform unnormalised/diverged_epoch/seed1"]
    assert entry["metric"] == "diverged_epoch" and entry["op"] == "value"
    assert entry["dvc_repro"] == ["ablate_raw_noise@cifar100_sgd-norm-false-src-uniform-1"]
    assert numbers["Table VI/Uniform/error/mean"]["dvc_repro"] == \
        [f"ablate_noise@cifar100_sgd-src-uniform-{s}" for s in ABL_SEEDS]
    prov = json.loads((out / "provenance.json").read_text())["runs"]  # an ablation's config diff: from the preset
    assert prov["runs/classification/cifar100_sgd-gal-src-uniform-s1"]["baseline"] == \
        "runs/classification/cifar100_sgd-gal-s1"


def test_diverged_epochs_per_seed(tmp_path):
    """Seeds that diverged at different epochs: each one's epoch, in seed order."""
    from pipelines.report.specs import table6

    made = make_runs(tmp_path / "runs")
    path = made["cifar100_sgd-gal-norm-false-src-uniform-s1"]
    edit_run(path, metrics=lambda m: m.update(diverged_epoch=3))
    rendered = table6.SPEC.render(Context(runs_root=tmp_path / "runs", out=tmp_path / "out"))
    assert ["uniform noise", "no", "2", "diverged (epochs 2, 3)", "diverged (epochs 2, 3)"] in rendered.layout.rows


def test_table8_rows_params_and_paper(site):
    out = site["out"]
    rows = by_key(out / "tables/table8.csv")
    shown = {("MLP", "256"): "mlp-256", ("MLP", "256-64-32"): "", ("MLP", "256-64-32-16"): "mlp-256-64-32-16",
             ("CNN", "256"): "cnn-256", ("CNN", "256-64-32"): "cnn-256,64,32"}
    for (kind, arch), variant in shown.items():
        v = abl_best("cifar100_sgd", variant)  # the paper's numbers are best-epoch
        assert float(rows[f"Table VIII/{kind}/{arch}/final_error/mean"]["value"]) == pytest.approx(
            np.mean(abl_values("cifar100_sgd", variant)), rel=1e-12)
        mean = rows[f"Table VIII/{kind}/{arch}/error/mean"]
        assert float(mean["value"]) == pytest.approx(np.mean(v), rel=1e-12)
        std = rows[f"Table VIII/{kind}/{arch}/error/std"]
        assert float(std["value"]) == pytest.approx(np.std(v, ddof=1), rel=1e-12)
        assert float(mean["paper"]) == {"MLP": {"256": 11.68, "256-64-32": 11.26, "256-64-32-16": 11.84},
                                        "CNN": {"256": 12.15, "256-64-32": 11.88}}[kind][arch]
    for kind, arch in (("MLP", "256-64"), ("CNN", "256-64"), ("CNN", "256-64-32-16")):  # no runs: left out
        assert not [k for k in rows if k.startswith(f"Table VIII/{kind}/{arch}/")]
    assert rows["Table VIII/MLP/256-64-32/params_adjuster/mean"]["text"] == "47.2K"  # 47,232 weights
    assert rows["Table VIII/CNN/256-64-32/params_adjuster/mean"]["text"] == "171.7K"  # 171,776, truncated
    md = (out / "tables/table8.md").read_text()
    assert "| Adjuster | Hidden widths | n | Params (ours) | Params (paper) | Top-1 error (%), best epoch (ours) | " \
           "Top-1 error (%) (paper) | Top-1 error (%), final epoch (ours) |" in md
    mlp256, cnn256 = ours(abl_values("cifar100_sgd", "mlp-256")), ours(abl_values("cifar100_sgd", "cnn-256"))
    assert f"| MLP | 256 | 2 | 51.2K | 51.2K | {mlp256} | 11.68 | {mlp256} |" in md
    assert (f"| MLP | 256-64-32 | 3 | 47.2K | 47.2K | {ours(abl_best('cifar100_sgd', ''))} | 11.26 | "
            f"{ours(abl_values('cifar100_sgd', ''))} |") in md
    assert f"| CNN | 256 | 2 | 28.1K | 28.1K | {cnn256} | 12.15 | {cnn256} |" in md
    assert "| MLP | 256-64 |" not in md and "| CNN | 256-64-32-16 |" not in md
    assert "MLP 256-64 (variant mlp-256,64; `dvc repro ablate_adjuster`); CNN 256-64 (variant cnn-256,64; " \
           "`dvc repro ablate_adjuster`); CNN 256-64-32-16" in md
