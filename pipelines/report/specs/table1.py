"""Table I: CIFAR-10 top-1 test error, EfficientNet-B1, baseline vs GAL per optimiser, over seeds."""
from pipelines.report.comparison import ComparisonTable, Metric

SPEC = ComparisonTable(
    name="Table I",
    slug="table1",
    task="classification",
    caption="Table I: CIFAR-10 top-1 test error (%), EfficientNet-B1, baseline (the paper's \"Reproduced\") vs "
            "GAL per optimiser (mean ± std over seeds; t-test baseline vs GAL)",
    group_key="experiment",
    groups={"cifar10_sgd": "SGD", "cifar10_lookahead": "Lookahead", "cifar10_adabound": "AdaBound"},
    group_title="Optimiser",
    metrics=(Metric("error", "val_top1_err", better="lower", label="Top-1 error (%)", digits=2),),
    methods={"baseline": "Reproduced", "gal": "GAL"},
    references=True,
)
