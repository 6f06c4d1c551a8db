"""The reproduction pipeline: data, training tasks, tracking and the report, run as the DVC stages of dvc.yaml."""
