"""Table IV: COCO 2017 val box AP of DETR-R50 and DETR-R101, baseline vs GAL on the boxes, over seeds, with
parameter counts."""
from pipelines.report.comparison import ComparisonTable, Metric, Params

SPEC = ComparisonTable(
    name="Table IV",
    slug="table4",
    task="detection",
    stage="train_detection",
    caption="Table IV: COCO 2017 val box AP (%) of DETR, baseline (the paper's \"Reproduced\") vs GAL on the "
            "matched boxes' 4 coordinates (mean ± std over seeds; t-test baseline vs GAL) and trainable "
            "parameter counts (model + GAL's adjuster weights)",
    group_key="experiment",
    groups={"coco_detr_r50": "DETR-R50", "coco_detr_r101": "DETR-R101"},
    group_title="Model",
    metrics=tuple(Metric(name, f"val_{name}", better="higher", label=f"{name} (%)", digits=2)
                  for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")),
    methods={"baseline": "Reproduced", "gal": "GAL"},
    params=Params(digits=0, extra_digits=None),  # the paper's "41M+1344"
    references=True,
)
