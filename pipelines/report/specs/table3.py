"""Table III: ImageNet top-1 / top-5 accuracy, baseline vs GAL per model, over seeds, with parameter counts."""
from pipelines.report.comparison import ComparisonTable, Metric, Params

SPEC = ComparisonTable(
    name="Table III",
    slug="table3",
    task="classification",
    stage="train_imagenet",
    caption="Table III: ImageNet top-1 / top-5 validation accuracy (%), baseline (the paper's \"Reproduced\") vs "
            "GAL per model (mean ± std over seeds; t-test baseline vs GAL) and parameter counts (model + GAL's "
            "adjuster, as the trainer counts them; the paper's 23.5M for ResNet-50 matches the network without "
            "its 2.05M-weight classifier)",
    group_key="experiment",
    groups={"imagenet_resnet50": "ResNet-50 (RMSProp)", "imagenet_efficientnet_b2": "EfficientNet-B2"},
    group_title="Model",
    # timm's train.py (the authors' ImageNet script) reports the epoch of best top-1 (the EMA model's, as val_*)
    metrics=(Metric("top1", "val_top1_acc", better="higher", label="Top-1 acc. (%), best epoch", digits=2,
                    epoch="best", history="val_top1_err", complement=True),
             Metric("top5", "val_top5_acc", better="higher", label="Top-5 acc. (%), best epoch", digits=2,
                    epoch="best", history="val_top5_err", complement=True),
             Metric("final_top1", "val_top1_acc", better="higher", label="Top-1 acc. (%), final epoch", digits=2),
             Metric("final_top5", "val_top5_acc", better="higher", label="Top-5 acc. (%), final epoch", digits=2)),
    methods={"baseline": "Reproduced", "gal": "GAL"},
    params=Params(),
    references=True,
)
