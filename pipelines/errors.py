"""The one error base of every stage and the one way a stage reports it.

A ``UserError`` is an expected failure the user fixes (a bad setting, a missing or corrupt input, an
unreachable store): it is printed as one line, ``<stage>: <message>``, on stderr, and the stage exits with
``USER_ERROR`` (2). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

USER_ERROR = 2  # exit code of every stage for an error the user fixes


class UserError(RuntimeError):
    """An expected failure; its message is one line that says what happened and what to do."""

    prefix = ""  # e.g. "bad config: "

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class RunError(UserError):
    """An expected failure of a training run (missing or unreadable input, a model that cannot be built)."""


class TrackingError(UserError):
    """Tracking failed, or a run may not continue its checkpoint; one line saying what happened and what to do."""


class ConfigError(UserError):
    """A bad or incomplete setting, found before any compute."""

    prefix = "bad config: "


def print_error(stage: str, err: UserError) -> int:
    """Print ``err`` as the stage's one line on stderr; the exit code of a user error."""
    print(f"{stage}: {err.prefix}{err}", file=sys.stderr)
    return USER_ERROR


def run_cli(stage: str, main: Callable[[], int | None]) -> int:
    """``main()``'s exit code (None: 0); a UserError (or an OmegaConf error: a bad override) is one line."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return main() or 0
    except UserError as err:
        return print_error(stage, err)
    except OmegaConfBaseException as err:
        return print_error(stage, ConfigError(str(err).splitlines()[0]))
