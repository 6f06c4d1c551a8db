"""Run selection (pipelines/report/selection.py): runs chosen by config and run.json's variant, never by
directory name; optional settings left out, absent runs named; mixed profiles and differing configs or data
within one aggregate refused."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.report import __main__ as report_cli
from pipelines.report import over_seeds
from pipelines.report.model import Context
from pipelines.report.records import MissingRuns, ReportError
from pipelines.report.selection import Setting, select
from pipelines.report.specs import fig6, fig8b, table5
from tests.pipelines.report_fixtures import CLS_SEEDS, SEEDS, edit_run, make_runs, values_of


def test_classification_selection(tmp_path):
    """Fig. 6 leaves out EfficientNet-B2 when it has no GAL runs; Fig. 8b names the runs it lacks; a run of
    another profile is refused."""
    made = make_runs(tmp_path / "runs", profiles={"cifar10_sgd-baseline-s2": "paper"})
    with pytest.raises(ReportError, match=r"Fig\. 5: runs come from mixed profiles: paper \(1 runs, e\.g\. "
                                          r".*runs/classification/cifar10_sgd-baseline-s2\); smoke"):
        select("Fig. 5", Context(runs_root=tmp_path / "runs", out=tmp_path / "out"), over_seeds.TASK,
               over_seeds.PER_DATASET, ("baseline", "gal"))
    shutil.rmtree(made["cifar10_sgd-baseline-s2"])
    for name, path in made.items():
        if name.startswith("imagenet_efficientnet_b2-gal"):
            shutil.rmtree(path)
    ctx = Context(runs_root=tmp_path / "runs", out=tmp_path / "out")
    spec = fig6.SPEC
    cells, profile = select(spec.name, ctx, over_seeds.TASK, spec.settings, (spec.method,), optional=spec.optional)
    assert sorted(cells) == [("ResNet-50", "gal")] and profile == "smoke"
    assert [r.get("seed") for r in cells[("ResNet-50", "gal")]] == list(CLS_SEEDS)
    for name, path in made.items():
        if name.startswith("imagenet_resnet50-gal"):
            shutil.rmtree(path)
    with pytest.raises(MissingRuns, match=r"Fig\. 8b: missing runs under .*ImageNet/gal: no runs \(experiment="
                                          r"imagenet_resnet50\).*make them with `dvc repro train_imagenet`"):
        fig8b.SPEC.render(Context(runs_root=tmp_path / "runs", out=tmp_path / "out"))


def test_runs_are_selected_by_config_and_variant(tmp_path):
    """Variant runs (run.json's variant) beside the presets' own: Table V takes only variant "" runs, by their
    config (not their directory names); a setting that asks for a variant gets exactly its runs."""
    runs = tmp_path / "runs"
    made = make_runs(runs)
    made["boston-gal-s0"].rename(runs / "regression" / "zz-renamed")  # the name does not matter
    variant = []
    for seed in SEEDS:
        path = runs / "regression" / f"boston-gal-eps0.001-s{seed}"
        shutil.copytree(made[f"boston-gal-s{seed}"] if seed else runs / "regression" / "zz-renamed", path)
        edit_run(path, config=lambda c: c["method"].update(ratio=0.001), metrics=lambda m: m.update(test_mae=99.0),
                 meta=lambda m: m.update(variant="eps0.001"))
        variant.append(path)
    edit_run(made["boston-gal-s1"], meta=lambda m: m.update(variant=""))  # "" and absent are the same
    ctx = Context(runs_root=runs, out=tmp_path / "out")
    numbers = {n.key: n for n in table5.SPEC.render(ctx).numbers}
    gal = numbers["Table V/Boston/GAL/MAE/mean"]
    assert gal.value == pytest.approx(np.mean(values_of("boston", "gal", "MAE")), rel=1e-12)
    assert [r.dir.rsplit("/", 1)[-1] for r in gal.runs] == ["zz-renamed"] + [f"boston-gal-s{s}" for s in SEEDS][1:]

    ablation = [Setting("eps 0.001", {"data.name": "boston"}, stage="ablation", variant="eps0.001")]
    cells, _ = select("Ablation", ctx, "regression", ablation, ("gal",))
    assert [r.path for r in cells[("eps 0.001", "gal")]] == variant
    assert [r.metric("test_mae") for r in cells[("eps 0.001", "gal")]] == [99.0] * len(SEEDS)
    with pytest.raises(MissingRuns, match=r"Ablation: no runs under .*runs/regression with data\.name=boston "
                                          r"\(variant eps0\.01\) x method\.name in \{gal\}; make them with `dvc "
                                          r"repro ablation`"):
        select("Ablation", ctx, "regression", [Setting("eps 0.01", {"data.name": "boston"}, stage="ablation",
                                                       variant="eps0.01")], ("gal",))


def test_runs_of_one_number_must_share_their_config(tmp_path, monkeypatch):
    """seed, trainer.* (but its precision) and root may differ within a cell; anything else is refused, naming
    the odd run."""
    monkeypatch.chdir(tmp_path)
    made = make_runs(Path("runs"))
    edit_run(made["boston-gal-s1"], config=lambda c: c.update(trainer={"gpus": 4}, root="elsewhere"))
    table5.SPEC.render(Context(runs_root=Path("runs"), out=Path("out")))
    edit_run(made["boston-gal-s3"], config=lambda c: (c["task"].update(epochs=16), c["method"].pop("scale")))
    with pytest.raises(ReportError) as err:
        table5.SPEC.render(Context(runs_root=Path("runs"), out=Path("out")))
    assert str(err.value).startswith(
        "Table V: runs/regression/boston-gal-s3 differs from runs/regression/boston-gal-s0 in config "
        "method.scale (1.0 vs <absent>), task.epochs (15 vs 16); runs aggregated together may differ only in "
        "seed, root, trainer.* (not in precision)")
    # a run in bf16 (auto on a GPU) and one in fp32 (auto on a CPU) never make one number
    edit_run(made["boston-gal-s3"], config=lambda c: (c["task"].update(epochs=15), c["method"].update(scale=1.0),
                                                      c.update(trainer={"resolved_precision": "bf16"})))
    with pytest.raises(ReportError, match="boston-gal-s3 differs .* in config trainer.resolved_precision"):
        table5.SPEC.render(Context(runs_root=Path("runs"), out=Path("out")))


def test_runs_of_one_cell_must_share_their_data(tmp_path, monkeypatch, capsys):
    """Runs averaged into one number whose data checksums differ (data edited or prepared again between them)
    are refused in one line naming two of them and the file; a record without checksums differs as well."""
    monkeypatch.chdir(tmp_path)
    made = make_runs(Path("runs"))
    data = "data/processed/boston.npz"
    edit_run(made["boston-gal-s3"], meta=lambda m: m["data_checksums"].update({data: "md5:" + "cd" * 16}))
    with pytest.raises(ReportError) as err:
        table5.SPEC.render(Context(runs_root=Path("runs"), out=Path("out")))
    assert str(err.value) == (
        f"Table V: runs/regression/boston-gal-s3 and runs/regression/boston-gal-s0 were trained on different data: "
        f"{data} (md5:{'ab' * 16} vs md5:{'cd' * 16}) (run.json data_checksums); runs aggregated together must share "
        "their data: rerun the stale runs (dvc repro) or remove them")
    assert report_cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"report: {err.value}\n" and not Path("reports").exists()

    edit_run(made["boston-gal-s3"], meta=lambda m: m.pop("data_checksums"))
    with pytest.raises(ReportError, match=rf"boston-gal-s3 and .*boston-gal-s0 were trained on different data: "
                                          rf"{data} \(md5:(ab)+ vs <absent>\)"):
        table5.SPEC.render(Context(runs_root=Path("runs"), out=Path("out")))
    edit_run(made["boston-gal-s3"], meta=lambda m: m.update(data_checksums={data: "md5:" + "ab" * 16}))
    table5.SPEC.render(Context(runs_root=Path("runs"), out=Path("out")))  # the same data again: taken
