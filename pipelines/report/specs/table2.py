"""Table II: CIFAR-100 top-1 test error, EfficientNet-B1, baseline vs GAL per optimiser, over seeds."""
from pipelines.report.comparison import ComparisonTable, Metric

SPEC = ComparisonTable(
    name="Table II",
    slug="table2",
    task="classification",
    caption="Table II: CIFAR-100 top-1 test error (%), EfficientNet-B1, baseline (the paper's \"Reproduced\") vs "
            "GAL per optimiser (mean ± std over seeds; t-test baseline vs GAL)",
    group_key="experiment",
    groups={"cifar100_sgd": "SGD", "cifar100_lookahead": "Lookahead", "cifar100_adabound": "AdaBound"},
    group_title="Optimiser",
    metrics=(Metric("error", "val_top1_err", better="lower", label="Top-1 error (%)", digits=2),),
    methods={"baseline": "Reproduced", "gal": "GAL"},
    references=True,
)
