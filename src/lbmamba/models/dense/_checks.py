"""Argument checks shared by the dense models' builders and modules: one message form for every argument."""

from __future__ import annotations

__all__ = ["check_int", "check_choice"]


def check_int(name: str, value, minimum: int = 1) -> int:
    """`value` if it is an int (not a bool) >= `minimum`, else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> str:
    """`value` if it is one of `choices`, else a ValueError naming `name` and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
