"""Bad input as one line: the exceptions the command line prints without a traceback, and the one place
that turns the lower layers' input errors into them.

Every engine entry point runs under `user_errors()`; `lbmamba <command>` prints a `UserError` as
`lbmamba <command>: error: <message>` on stderr and exits with status 1.
"""

from __future__ import annotations

import contextlib

from ..data import DataError
from ..models.checkpoint import CheckpointMismatchError, CheckpointReadError

__all__ = ["UserError", "TrainingDivergedError", "user_errors", "last_line"]


class UserError(Exception):
    """Bad input from the user: a missing directory, an unknown model name, a config that does not fit."""


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


#: errors of the data and model layers that mean "bad input" (each names the file or argument at fault)
_INPUT_ERRORS = (DataError, CheckpointMismatchError, CheckpointReadError)


def last_line(message: str) -> str:
    """The error message proper, also when a DataLoader worker wrapped it in its traceback."""
    if "Traceback" not in message:
        return " ".join(message.split())
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else message
    head, sep, rest = last.partition(": ")
    return rest if sep and head.endswith("Error") else last


@contextlib.contextmanager
def user_errors():
    """Re-raise the data and model layers' input errors as one-line `UserError`s (a context manager and,
    like every `contextlib.contextmanager`, a decorator)."""
    try:
        yield
    except UserError:
        raise
    except _INPUT_ERRORS as exc:
        raise UserError(last_line(str(exc))) from exc
