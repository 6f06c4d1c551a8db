"""The only code that talks to MLflow and writes run records; one job per module:

    store       where the MLflow store is and whether it answers (tracking_uri, check_tracking_server)
    provenance  git state and diff, data checksums, env lock: what a run was made from
    record      the run record's files, config -> params, finite metrics
    resume      the one resume decision (config_digest, decide) and RunTracker's state checks
    run         RunTracker: the MLflow run lifecycle

    with RunTracker("regression", "boston-gal-s0", cfg, profile="smoke", data_files=[...]) as tracker:
        tracker.log_epoch(1, {"train_loss": 0.5})
        tracker.log_final({"test_mae": 0.4})

Import the module you need (importing the package runs nothing: the report reads records with
``record`` alone); none imports mlflow or matplotlib at import time. What is recorded, tagged and resumed: pipelines/CONTRACT.md.
"""
