"""Table I: CIFAR-10 top-1 test error, EfficientNet-B1, baseline vs GAL per optimiser, over seeds."""
from pipelines.report.comparison import ComparisonTable, Metric


def cifar_table(name: str, slug: str, dataset: str, title: str) -> ComparisonTable:
    """Tables I and II: one row group per optimiser preset of ``dataset`` (conf/experiment/<dataset>_<optim>)."""
    return ComparisonTable(
        name=name,
        slug=slug,
        task="classification",
        stage="train_cifar",
        caption=f"{name}: {title} top-1 test error (%), EfficientNet-B1, baseline (the paper's \"Reproduced\") "
                "vs GAL per optimiser (mean ± std over seeds; t-test baseline vs GAL)",
        group_key="experiment",
        groups={f"{dataset}_sgd": "SGD", f"{dataset}_lookahead": "Lookahead", f"{dataset}_adabound": "AdaBound"},
        group_title="Optimiser",
        metrics=(Metric("error", "val_top1_err", better="lower", label="Top-1 error (%), best epoch", digits=2,
                        epoch="best"),  # the authors' CIFAR script reports its "Best err": the paper's numbers
                 Metric("final_error", "val_top1_err", better="lower", label="Top-1 error (%), final epoch",
                        digits=2)),
        methods={"baseline": "Reproduced", "gal": "GAL"},
        references=True,
    )


SPEC = cifar_table("Table I", "table1", "cifar10", "CIFAR-10")
