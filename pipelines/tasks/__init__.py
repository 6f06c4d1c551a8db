"""One folder per task (regression, classification, detection), each a ``Task`` of the shared training
runtime (pipelines/training/) and its data. A task imports the runtime, never another task."""
