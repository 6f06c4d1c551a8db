"""One module per task (build -> train -> evaluate), each exposing run(cfg)."""


class RunError(RuntimeError):
    """An expected failure of a run (missing input, bad setting): reported in one line, exit code 2."""
