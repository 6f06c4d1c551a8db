"""Table V: regression (Boston, Diabetes, California), baseline vs GAL, mean ± std over seeds and t-test."""
from pipelines.report.comparison import ComparisonTable, Metric

SPEC = ComparisonTable(
    name="Table V",
    slug="table5",
    task="regression",
    stage="train_regression",
    caption="Table V: regression test error, baseline MLP vs GAL (mean ± std over seeds; t-test baseline vs GAL)",
    group_key="data.name",
    groups={"boston": "Boston", "diabetes": "Diabetes", "california": "California"},
    group_title="Dataset",
    metrics=(Metric("MAE", "test_mae", better="lower"),
             Metric("MSE", "test_mse", better="lower"),
             Metric("R2", "test_r2", better="higher", label="R²")),
)
