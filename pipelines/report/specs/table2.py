"""Table II: CIFAR-100 top-1 test error, EfficientNet-B1, baseline vs GAL per optimiser, over seeds."""
from pipelines.report.specs.table1 import cifar_table

SPEC = cifar_table("Table II", "table2", "cifar100", "CIFAR-100")
