"""One module per task (build -> train -> evaluate) on the shared runner (pipelines/tasks/runner.py)."""
from pipelines.errors import UserError


class RunError(UserError):
    """An expected failure of a run (missing input, bad setting): reported in one line."""
