"""Exceptions the command line turns into one-line messages (no traceback)."""

from __future__ import annotations

__all__ = ["UserError", "TrainingDivergedError"]


class UserError(Exception):
    """Bad input from the user: a missing directory, an unknown model name, a config that does not fit.

    `lbmamba <command>` prints `lbmamba <command>: error: <message>` on stderr and exits with status 1.
    """


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""
