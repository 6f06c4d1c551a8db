"""The one error base of every stage and the one way a stage reports it.

A ``UserError`` is an expected failure the user fixes (a bad setting, a missing or corrupt input, an
unreachable store): it is printed as one line, ``<stage>: <message>``, on stderr, and the stage exits with
``USER_ERROR`` (2). Anything else is a bug and keeps its traceback.

SIGTERM (Slurm's scancel, ``timeout``, a container's stop), SIGHUP (a closed terminal) and SIGINT (Ctrl-C)
raise ``Interrupted`` in the stage, so every ``finally``, atomic write and tracked run cleans up as it would
for an error (a run ends KILLED); the stage then prints one line and exits 128 + the signal's number, as a
shell reports it.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

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


class Interrupted(KeyboardInterrupt):
    """The process was told to stop (SIGTERM, SIGHUP or SIGINT); a KeyboardInterrupt, so code that cleans up after
    Ctrl-C (PyTorch's DataLoader workers included) does the same for it."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_held: list[int] | None = None  # the signals that came inside signals_held(), else None


def _interrupt(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one stops the process at once, mid-cleanup or not
    if _held is not None:
        _held.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGTERM and SIGHUP (under run_cli) and SIGINT (Ctrl-C) wait until the block is done, then interrupt as
    usual: a write that must not be cut in two (torch.save's zip writer, interrupted, fails with an error of its
    own). A second signal still stops the process at once."""
    global _held
    if _held is not None:  # nested: the outer block holds them
        yield
        return
    # Python raises KeyboardInterrupt wherever SIGINT lands: while the block runs, _interrupt takes it instead
    ctrl_c = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ctrl_c:
        signal.signal(signal.SIGINT, _interrupt)
    _held = []
    try:
        yield
    finally:
        pending, _held = _held, None
        if ctrl_c and signal.getsignal(signal.SIGINT) is _interrupt:  # none came: Python's own handler again
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise Interrupted(pending[0])


def print_error(stage: str, err: UserError) -> int:
    """Print ``err`` as the stage's one line on stderr; the exit code of a user error."""
    print(f"{stage}: {err.prefix}{err}", file=sys.stderr)
    return USER_ERROR


def run_cli(stage: str, main: Callable[[], int | None],
            interrupted: str = "what it was writing is left as it was; rerun it") -> int:
    """``main()``'s exit code (None: 0); a UserError (or an OmegaConf error: a bad override) is one line, and
    so is an interruption (``interrupted`` says what is left and what to do)."""
    from omegaconf.errors import OmegaConfBaseException

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):  # not one a caller ignores (nohup ignores SIGHUP)
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, _interrupt)
    try:
        return main() or 0
    except UserError as err:
        return print_error(stage, err)
    except OmegaConfBaseException as err:
        return print_error(stage, ConfigError(str(err).splitlines()[0]))
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"{stage}: interrupted by {signal.Signals(signum).name}; {interrupted}", file=sys.stderr)
        return 128 + signum
